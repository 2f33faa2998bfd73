"""The typed run model: every value that crosses a layer, is stored, or is read back.

msgspec Structs rather than dataclasses: a page or record read back from disk or from the container is
decoded straight into typed values and validated as it is (a wrong type, a missing field or a path that
escapes its root is a clear error, ``codec.DamagedData``), at a fraction of the CPU and memory of dicts
for the million-entry records of large trees. ``codec`` is the one place values become bytes and back;
``records`` holds what a run records of each file; ``work`` the inputs, pages, results, progress and
summaries of the durable workflows; ``reports`` what commands hand to printers.
"""
