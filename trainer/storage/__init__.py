"""The ground floor: files written atomically (temporary name, fsync, rename), hashed as they are written and
made durable on a helper thread (``atomic.py``, ``checksums.py``); tensor files laid out before they are written,
written in parts by several processes and read back in slices (``tensor_files.py``, ``parts.py``,
``tensor_reader.py``, ``serialization.py``); JSON and paths from a folder read as data from someone else
(``json_files.py``, ``paths.py``); the host-memory snapshot of a background save (``staging.py``). Imports
nothing of ``trainer`` but ``trainer.errors``."""
