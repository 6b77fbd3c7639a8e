"""A deep-zoom web page of a map over its slide: ``fcconv view MAP.zarr --slide SLIDE``.

The server (standard library) renders tiles of the slide and of the map on demand; the page
(OpenSeadragon, shipped in ``static/``) shows them and asks the server what a cell holds.

Example:
    >>> from fcconv.viewer import ViewerApp, make_server, open_map, open_slide
    >>> server = make_server(ViewerApp(open_map("map.zarr"), open_slide("slide.tif")), port=8000)
    >>> server.serve_forever()
"""

from fcconv.viewer._map import Geometry, MapView, open_map
from fcconv.viewer._slide import Slide, open_slide
from fcconv.viewer.server import ViewerApp, make_server

__all__ = ["Geometry", "MapView", "Slide", "ViewerApp", "make_server", "open_map", "open_slide"]
