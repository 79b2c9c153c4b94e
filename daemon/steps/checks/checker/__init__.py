"""Code that runs inside a check container, on the user's image's own Python.

Standard library only, Python 3.9+ syntax: none of deployd's dependencies are
there. The daemon passes the source of `parse_dags.py` as `python -c`, so
nothing has to be copied into the (read-only) image.
"""

from pathlib import Path

PARSE_DAGS = Path(__file__).with_name("parse_dags.py")
RESULT_MARK = "@@deployd-check-result@@ "
