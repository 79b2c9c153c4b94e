"""The web dashboard: server-rendered pages over the shared use cases.

viewer.py     who is looking (a signed-in key, or a signed status link) and what
              they may see and do
identity.py   sign-in with an SSH key (`ssh … login` → one-time URL → session
              cookie), sessions, signed status links, CSRF tokens; the middleware
              that puts request[VIEWER]
pages.py      overview, deployment history, deploy page, the rollback action
live.py       a deploy's log pushed to the browser as it is written (SSE)
templates/    Jinja2 templates;  static/  the CSS and JavaScript, shipped in the package
"""
