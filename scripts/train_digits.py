"""Train the embedded digits classifier of ``fcconv demo`` and write it into the package.

Usage (needs the ``train`` extra for scikit-learn's bundled digits; nothing is downloaded)::

    pip install -e ".[train]"
    python scripts/train_digits.py            # writes src/fcconv/data/digits_cnn.pt and digits_heldout.pt
    python scripts/train_digits.py --tune     # trains on 90% of the training digits, reports the other 10%

The data are scikit-learn's ``load_digits`` (UCI optdigits, 1797 8x8 images, values 0..16; CC BY 4.0).
20 images per digit (200) are set aside, never trained on, and shipped as the demo's held-out set; the
model trains on windows synthesised from the other 1597:

* a digit centred in a 12x12 window within one pixel (label: the digit), sometimes with neighbouring
  digits cut by the window's border;
* ``background``: blank windows, and windows where every digit is at least three pixels off centre
  (off-centre digits, fragments, parts of two neighbours).

Windows two pixels off centre are never shown: the detector's non-maximum suppression resolves them.
Training is deterministic: fixed seeds, one thread, ``torch.use_deterministic_algorithms(True)``.
Rerunning it on the same machine and torch version rewrites the same weights.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fcconv.demo.digits import (
    BACKGROUND,
    HELDOUT_FILE,
    MARGIN,
    WEIGHTS_FILE,
    WINDOW,
    DigitsCNN,
    center_in_window,
    paste,
)

DATA_DIR = Path(__file__).resolve().parents[1] / "src" / "fcconv" / "data"
HELDOUT_PER_CLASS = 20
POSITIVE_SHIFT = 2  # a digit up to this many pixels off centre (per axis) is a hit; farther, background
MIN_GAP = 9  # digits never overlap: their top-left corners differ by >= 9 pixels along some axis


def split_digits(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's digits as uint8 0..16, split into (train, held-out) with 20 held-out per class."""
    from sklearn.datasets import load_digits  # only the training script needs scikit-learn

    data = load_digits()
    images = data.images.astype(np.uint8)
    labels = data.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    held = np.sort(
        np.concatenate(
            [rng.choice(np.flatnonzero(labels == d), HELDOUT_PER_CLASS, replace=False) for d in range(10)]
        )
    )
    train = np.setdiff1d(np.arange(len(labels)), held)
    return images[train], labels[train], images[held], labels[held]


def _chebyshev(a: tuple[int, int], b: tuple[int, int]) -> int:
    return max(abs(a[0] - b[0]), abs(a[1] - b[1]))


def _free(pos: tuple[int, int], placed: list[tuple[int, int]]) -> bool:
    return all(_chebyshev(pos, p) >= MIN_GAP for p in placed)


def synthesize(
    images: np.ndarray, labels: np.ndarray, n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` training windows ``(n, 12, 12)`` float32 in [0, 1] and their labels, half of them background.

    Offsets are of a digit's top-left corner from where a centred digit's would be (``MARGIN``).
    """
    digits = images.astype(np.float32) / 16.0
    x = np.zeros((n, WINDOW, WINDOW), dtype=np.float32)
    y = np.empty(n, dtype=np.int64)
    reach = WINDOW - 1  # offsets beyond this leave the window blank
    for k in range(n):
        window = x[k]
        placed: list[tuple[int, int]] = []
        if rng.random() < 0.5:
            i = int(rng.integers(len(digits)))
            dy, dx = rng.integers(-POSITIVE_SHIFT, POSITIVE_SHIFT + 1, size=2)
            pos = (int(dy), int(dx))
            paste(window, digits[i], MARGIN + pos[0], MARGIN + pos[1])
            placed.append(pos)
            y[k] = labels[i]
            n_others = int(rng.choice(4, p=[0.4, 0.3, 0.2, 0.1]))
        else:
            y[k] = BACKGROUND
            n_others = int(rng.choice(5, p=[0.1, 0.35, 0.3, 0.15, 0.1]))
        tries = 0
        while n_others > 0 and tries < 50:
            tries += 1
            pos = (int(rng.integers(-reach, reach + 1)), int(rng.integers(-reach, reach + 1)))
            if _chebyshev(pos, (0, 0)) <= POSITIVE_SHIFT or not _free(pos, placed):
                continue
            paste(window, digits[int(rng.integers(len(digits)))], MARGIN + pos[0], MARGIN + pos[1])
            placed.append(pos)
            n_others -= 1
    return x, y


def shifted_accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray, max_shift: int) -> float:
    """Accuracy (11-way argmax) on digits shifted by up to ``max_shift`` pixels in each axis."""
    digits = images.astype(np.float32) / 16.0
    correct = total = 0
    for dy in range(-max_shift, max_shift + 1):
        for dx in range(-max_shift, max_shift + 1):
            x = np.zeros((len(digits), WINDOW, WINDOW), dtype=np.float32)
            for k in range(len(digits)):
                paste(x[k], digits[k], MARGIN + dy, MARGIN + dx)
            with torch.no_grad():
                pred = model(torch.from_numpy(x).unsqueeze(1)).argmax(1).numpy()
            correct += int((pred == labels).sum())
            total += len(labels)
    return correct / total


def background_rejection(model: nn.Module, images: np.ndarray, labels: np.ndarray, seed: int) -> float:
    """Fraction of synthetic background windows (made from ``images``) classified as background."""
    rng = np.random.default_rng(seed)
    x, y = synthesize(images, labels, 4000, rng)
    keep = y == BACKGROUND
    with torch.no_grad():
        pred = model(torch.from_numpy(x[keep]).unsqueeze(1)).argmax(1).numpy()
    return float((pred == BACKGROUND).mean())


def train(
    images: np.ndarray, labels: np.ndarray, *, epochs: int, per_epoch: int, seed: int
) -> DigitsCNN:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = DigitsCNN()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    batch = 128
    steps = epochs * (per_epoch // batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(epochs):
        start = time.perf_counter()
        x_np, y_np = synthesize(images, labels, per_epoch, rng)
        x, y = torch.from_numpy(x_np).unsqueeze(1), torch.from_numpy(y_np)
        order = torch.randperm(per_epoch)
        model.train()
        total = 0.0
        for b in range(per_epoch // batch):
            idx = order[b * batch : (b + 1) * batch]
            optimizer.zero_grad()
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item()
        model.eval()
        print(
            f"epoch {epoch + 1:2d}/{epochs}  loss {total / (per_epoch // batch):.4f}  "
            f"({time.perf_counter() - start:.1f} s)",
            flush=True,
        )
    return model


def report(model: nn.Module, images: np.ndarray, labels: np.ndarray, what: str, seed: int) -> float:
    with torch.no_grad():
        logits = model(center_in_window(torch.from_numpy(images.astype(np.float32) / 16.0)))
    pred = logits.argmax(1).numpy()
    acc = float((pred == labels).mean())
    digit_only = float((logits[:, :BACKGROUND].argmax(1).numpy() == labels).mean())
    rows = [
        ("accuracy, centred, 11 classes (background counts as an error)", acc),
        ("accuracy, centred, best of the ten digits", digit_only),
        (f"accuracy, shifted by up to {POSITIVE_SHIFT} pixels, 11 classes",
         shifted_accuracy(model, images, labels, POSITIVE_SHIFT)),
        ("background windows rejected", background_rejection(model, images, labels, seed)),
    ]
    print(f"{what}: {len(labels)} digits")
    for name, value in rows:
        print(f"  {name + ':':<64}{value:.2%}")
    return acc


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--per-epoch", type=int, default=24576, help="synthetic windows per epoch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tune", action="store_true",
                        help="hold out 10%% of the training digits to validate on; write nothing")
    parser.add_argument("--out", type=Path, default=DATA_DIR, help="where to write the files")
    args = parser.parse_args()

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    start = time.perf_counter()
    train_x, train_y, held_x, held_y = split_digits(args.seed)
    if args.tune:
        rng = np.random.default_rng(args.seed + 1)
        val = rng.random(len(train_y)) < 0.1
        held_x, held_y = train_x[val], train_y[val]
        train_x, train_y = train_x[~val], train_y[~val]
    print(f"training on {len(train_y)} digits, {'validating' if args.tune else 'holding out'} {len(held_y)}")
    model = train(train_x, train_y, epochs=args.epochs, per_epoch=args.per_epoch, seed=args.seed)
    print(f"trained in {time.perf_counter() - start:.1f} s")
    report(model, held_x, held_y, "validation" if args.tune else "held-out", args.seed + 2)
    if args.tune:
        return
    args.out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in model.state_dict().items()}
    torch.save(state, args.out / WEIGHTS_FILE)
    torch.save(
        {"images": torch.from_numpy(held_x.copy()), "labels": torch.from_numpy(held_y.astype(np.uint8))},
        args.out / HELDOUT_FILE,
    )
    for name in (WEIGHTS_FILE, HELDOUT_FILE):
        print(f"wrote {args.out / name} ({(args.out / name).stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
