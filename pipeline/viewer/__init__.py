"""A live viewer for a finished run directory, in the browser (the Deep Visualization
Toolbox's panes for Keras models): `python -m pipeline.viewer RUN_DIR`.

session.py  what the run holds and what the model computes live
server.py   the local HTTP server and its JSON API
page.py     the one page it serves
"""
