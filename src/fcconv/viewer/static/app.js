// fcconv view: OpenSeadragon over the server's tiles. The server does the maths (which cell is
// under a point, its top classes, the colours); this page only draws what it answers.
"use strict";

(async function main() {
  const info = await (await fetch("api/info")).json();
  const state = { view: "argmax", hidden: new Set(info.hidden), version: 0, mapItem: null, complete: info.complete };
  const $ = (id) => document.getElementById(id);

  function source(url) {
    return {
      width: info.width, height: info.height, tileSize: info.tileSize, tileOverlap: 0,
      minLevel: 0, maxLevel: info.maxLevel, getTileUrl: url,
    };
  }

  function mapSource() {
    const view = state.view, version = state.version;
    const hide = view === "argmax" && state.hidden.size ? "&hide=" + [...state.hidden].join(",") : "";
    return source((level, x, y) => `tiles/map/${view}/${level}/${x}_${y}.png?v=${version}${hide}`);
  }

  const viewer = OpenSeadragon({
    id: "viewer", prefixUrl: "static/openseadragon/images/", drawer: "canvas", showNavigator: true,
    maxZoomPixelRatio: 16, imageSmoothingEnabled: false, gestureSettingsMouse: { clickToZoom: false },
  });
  if (info.slide) viewer.addTiledImage({ tileSource: source((l, x, y) => `tiles/slide/${l}/${x}_${y}.jpg`) });

  function opacity() { return parseFloat($("opacity").value); }

  // A new map layer goes on top; the old one leaves once the new one is drawn (no flicker).
  function reloadMap() {
    state.version += 1;
    const old = state.mapItem;
    viewer.addTiledImage({
      tileSource: mapSource(), opacity: opacity(),
      success: (event) => {
        state.mapItem = event.item;
        if (!old) return;
        const drop = () => { if (viewer.world.getIndexOfItem(old) !== -1) viewer.world.removeItem(old); };
        if (event.item.getFullyLoaded()) drop();
        else { event.item.addOnceHandler("fully-loaded-change", drop); setTimeout(drop, 5000); }
      },
    });
  }

  // Controls: title, status, view picker, legend, opacity, geometry.
  $("title").textContent = info.map + (info.slideName ? " over " + info.slideName : "");
  const picker = $("view");
  picker.add(new Option("Winning class (argmax)", "argmax"));
  info.classes.forEach((name, k) => picker.add(new Option(`Probability of ${name}`, `class-${k}`)));
  picker.addEventListener("change", () => { state.view = picker.value; drawLegend(); reloadMap(); });
  $("opacity").addEventListener("input", () => {
    $("opacity-value").textContent = Math.round(opacity() * 100) + "%";
    if (state.mapItem) state.mapItem.setOpacity(opacity());
  });
  $("opacity-value").textContent = Math.round(opacity() * 100) + "%";
  $("refresh").addEventListener("click", reloadMap);
  const mpp = info.mpp ? `, ${info.mpp[0]} x ${info.mpp[1]} µm per image pixel` : "";
  $("geometry").textContent = `${info.grid[0]} x ${info.grid[1]} cells; stride ${info.stride.join(" x ")}, ` +
    `window ${info.window.join(" x ")} at offset ${info.windowOffset.join(", ")} image pixels; ` +
    `image level ${info.level}, ${info.downsample} slide pixels per image pixel${mpp}.`;

  function drawLegend() {
    const legend = $("legend");
    legend.replaceChildren();
    if (state.view === "argmax") {
      info.classes.forEach((name, k) => {
        const row = document.createElement("div");
        const box = document.createElement("input");
        box.type = "checkbox"; box.checked = !state.hidden.has(k); box.title = "show this class";
        box.addEventListener("change", () => {
          if (box.checked) state.hidden.delete(k); else state.hidden.add(k);
          reloadMap();
        });
        const swatch = document.createElement("span");
        swatch.className = "swatch"; swatch.style.background = info.colours[k];
        row.append(box, swatch, document.createTextNode(name));
        legend.append(row);
      });
    } else {
      const bar = document.createElement("div");
      bar.id = "ramp"; bar.style.background = `linear-gradient(to right, ${info.ramp.join(", ")})`;
      const labels = document.createElement("div");
      labels.id = "ramp-labels";
      labels.innerHTML = "<span>0</span><span>softmax probability</span><span>1</span>";
      legend.append(bar, labels);
    }
    const notes = document.createElement("div");
    notes.innerHTML = (info.hasValid ? '<span class="swatch hatch"></span>skipped by the mask<br>' : "") +
      '<span class="swatch"></span>transparent: not computed yet';
    legend.append(notes);
  }
  drawLegend();

  // Polling while the map is being written: new tiles appear as they finish.
  function showStatus() {
    const every = `refreshing every ${info.refreshSeconds} s.`;
    $("status").textContent = state.complete === true ? "Map complete." :
      state.complete === false ? `Map being written: ${every}` : every[0].toUpperCase() + every.slice(1);
  }
  showStatus();
  setInterval(async () => {
    if (state.complete === true) return;
    const now = await (await fetch("api/info")).json();
    state.complete = now.complete;
    showStatus();
    reloadMap();
  }, 1000 * info.refreshSeconds);
  reloadMap();

  // Hover: ask the server for the cell under the pointer, draw its window, list its top classes.
  const frame = document.createElement("div");
  frame.id = "window";
  let framed = false, pending = null, busy = false;

  async function lookUp() {
    if (busy || !pending) return;
    const point = pending; pending = null; busy = true;
    try {
      const cell = await (await fetch(`api/cell?x=${point.x}&y=${point.y}`)).json();
      showCell(cell);
    } finally { busy = false; lookUp(); }
  }

  function showCell(cell) {
    const readout = $("readout");
    if (!cell.cell) {
      readout.textContent = "Off the map.";
      if (framed) { viewer.removeOverlay(frame); framed = false; }
      return;
    }
    const w = cell.window;
    const rect = viewer.world.getItemAt(0).imageToViewportRectangle(w.x, w.y, w.width, w.height);
    if (framed) viewer.updateOverlay(frame, rect); else { viewer.addOverlay(frame, rect); framed = true; }
    const where = `<div id="cell-index" data-row="${cell.cell[0]}" data-col="${cell.cell[1]}">` +
      `cell (${cell.cell[0]}, ${cell.cell[1]})` + (cell.valid === false ? ", skipped by the mask" : "") + "</div>";
    if (!cell.computed) {
      readout.innerHTML = where + (cell.valid === false ? "" : "<div>not computed yet</div>");
      return;
    }
    const rows = cell.top.map((t) =>
      `<tr class="top" data-class="${t.class}" data-score="${t.score}" data-probability="${t.probability}">` +
      `<td><span class="swatch" style="background:${info.colours[t.class]}"></span></td>` +
      `<td class="name"></td><td class="num">${(100 * t.probability).toFixed(1)}%</td>` +
      `<td class="num">${t.score.toPrecision(4)}</td></tr>`).join("");
    readout.innerHTML = where + `<table><tr><th></th><th>class</th><th>prob.</th><th>score</th></tr>${rows}</table>`;
    readout.querySelectorAll("td.name").forEach((td, i) => { td.textContent = cell.top[i].name; });
  }

  new OpenSeadragon.MouseTracker({
    element: viewer.canvas,
    moveHandler: (event) => {
      const item = viewer.world.getItemAt(0);
      if (!item) return;
      const point = item.viewportToImageCoordinates(viewer.viewport.pointFromPixel(event.position));
      pending = point;
      lookUp();
    },
  });

  // For tests and scripts: the viewer, the server's info, and whether every tile is drawn.
  window.fcconvViewer = {
    viewer, info, state,
    ready: () => viewer.world.getItemCount() > 0 && Array.from(
      { length: viewer.world.getItemCount() }, (_, i) => viewer.world.getItemAt(i).getFullyLoaded()).every(Boolean),
  };
})();
