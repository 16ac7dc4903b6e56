"""Hostile-input suite (HOSTILE.md, issue 7): one module per area, plus fuzzing of every public
function through ``registry.py``. See README.md in this folder for the item → test map."""
