"""``python -m alignforge.annotate serve ...`` (same as ``alignforge annotate ...``)."""

from alignforge.annotate.cli import annotate_app

if __name__ == "__main__":
    annotate_app(prog_name="alignforge annotate")
