"""The template of a paper's home: copy this folder to ``mdbench/papers/<paper>/`` (see CONTRIBUTING.md)."""
