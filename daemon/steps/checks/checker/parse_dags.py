# deployd's DAG checker. Runs inside a container of the freshly built image
# (no network, read-only root, limits), never in the daemon. Standard library
# only; Python 3.9+.
#
# Airflow is imported once; every DAG file is then imported in a forked child,
# several at a time, so that a file that exits, crashes, hangs or eats memory
# gets its own verdict and every other file still gets one. The report is one
# JSON line on stdout after RESULT_MARK; the daemon trusts it only if it is the
# only one and this process ends normally (DAG code shares our stdout).
import sys

# `python -c` puts the working directory (the project) first on the import path,
# so a project's selectors.py or json.py would be imported instead of the standard
# library's, into the checker itself. It is taken off while the checker imports its
# own modules, and put back for the DAGs, which import from the project.
_PROJECT_PATHS = [p for p in sys.path if p in ("", ".")]
sys.path[:] = [p for p in sys.path if p not in ("", ".")]
import ast  # noqa: E402
import faulthandler  # noqa: E402
import importlib  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import selectors  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402

sys.path[:0] = _PROJECT_PATHS

RESULT_MARK = "@@deployd-check-result@@ "
OUTPUT_KEEP = 4096
EXC_LINE = re.compile(r"^([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*): (.*)$")


def say(text):
    sys.stdout.write("deployd-check: %s\n" % text)
    sys.stdout.flush()


def load_exceptions(home):
    path = os.path.join(home, ".astro", "dag_integrity_exceptions.txt")
    allowed = set()
    try:
        with open(path) as fh:
            for line in fh:
                line = line.strip()
                if line and not line.startswith("#"):
                    allowed.add(os.path.normpath(line))
    except OSError:
        pass
    return allowed


# ---------------------------------------------------------------------------
# Parse-time lookups. Like Astro's generated integrity test, Airflow
# connections, variables and unset environment variables are answered with
# placeholders so that DAGs that look them up at import time can be checked.
# Unlike it, the placeholders survive int(), float(), bool(), .split(),
# iteration and json.loads, and every answer is reported per file.

LOOKUPS = []
_MISSING = object()


class Placeholder(str):
    """A string that also converts to a number (1) and parses as JSON (a dict)."""

    def __int__(self):
        return 1

    def __index__(self):
        return 1

    def __float__(self):
        return 1.0


class PlaceholderDict(dict):
    """A dict whose every missing key is a placeholder."""

    def __missing__(self, key):
        return Placeholder("deployd-placeholder-%s" % (key,))

    def get(self, key, default=None):
        return dict.get(self, key, default if default is not None else self[key])


def _placeholder(kind, name):
    LOOKUPS.append({"kind": kind, "name": str(name)[:200]})
    return Placeholder("deployd-placeholder-%s" % (name,))


def _fake_variable_get(key, *args, **kwargs):
    default = args[0] if args else kwargs.get("default_var", kwargs.get("default", _MISSING))
    as_json = kwargs.get("deserialize_json", args[1] if len(args) > 1 else False)
    if default is not _MISSING and type(default).__name__ not in ("ArgNotSet", "NOTSET"):
        return default
    if as_json:
        LOOKUPS.append({"kind": "variable", "name": str(key)[:200]})
        return PlaceholderDict()
    return _placeholder("variable", key)


def _connection_class():
    for module, attr in (("airflow.sdk", "Connection"), ("airflow.models", "Connection")):
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError):
            continue
    return None


def _fake_get_connection(conn_id, *args, **kwargs):
    LOOKUPS.append({"kind": "connection", "name": str(conn_id)[:200]})
    cls = _connection_class()
    try:
        return cls(conn_id=conn_id, conn_type="generic")
    except TypeError:
        return cls(conn_id)


_real_getenv = os.getenv


PROJECT = [""]


def _fake_getenv(key, default=_MISSING):
    if key in os.environ:
        return os.environ[key]
    if default is not _MISSING:
        return default
    # Only the project's own code gets placeholders: libraries (Airflow included)
    # asking whether a variable is set keep getting None.
    caller = sys._getframe(1).f_code.co_filename
    if PROJECT[0] and caller.startswith(PROJECT[0]):
        return _placeholder("env", key)
    return None


_real_json_loads = json.loads


def _fake_json_loads(s, *args, **kwargs):
    if isinstance(s, Placeholder):
        return PlaceholderDict()
    return _real_json_loads(s, *args, **kwargs)


def install_placeholders():
    """Patch the lookups a DAG file may make at import time (once, before forking)."""
    targets = (
        ("airflow.models", "Variable", "get", _fake_variable_get),
        ("airflow.models.variable", "Variable", "get", _fake_variable_get),
        ("airflow.sdk", "Variable", "get", _fake_variable_get),
        ("airflow.hooks.base", "BaseHook", "get_connection", _fake_get_connection),
        ("airflow.sdk", "BaseHook", "get_connection", _fake_get_connection),
        ("airflow.sdk.bases.hook", "BaseHook", "get_connection", _fake_get_connection),
    )

    for module, cls_name, attr, fake in targets:
        with warnings.catch_warnings():  # deprecated import paths still need patching
            warnings.simplefilter("ignore")
            try:
                cls = getattr(importlib.import_module(module), cls_name)
            except (ImportError, AttributeError):
                continue
        setattr(cls, attr, staticmethod(fake))
    os.getenv = _fake_getenv
    json.loads = _fake_json_loads


def dagbag_class():
    try:
        from airflow.dag_processing.dagbag import DagBag  # Airflow 3.x
    except ImportError:
        from airflow.models.dagbag import DagBag  # Airflow 2.x
    return DagBag


def discover(folder):
    """Airflow's own discovery: .airflowignore (either syntax) and safe mode."""
    try:
        from airflow.dag_processing.importers import get_importer_registry
    except ImportError:
        from airflow.utils.file import list_py_file_paths

        params = inspect.signature(list_py_file_paths).parameters
        kwargs = {"safe_mode": True}
        if "include_examples" in params:
            kwargs["include_examples"] = False
        return sorted(list_py_file_paths(folder, **kwargs))
    return sorted(get_importer_registry().list_dag_files(folder, safe_mode=True))


def airflow_imports(paths):
    """Airflow modules the DAG files import at top level (as Airflow's own processor does)."""
    found = set()
    for path in paths:
        if not path.endswith(".py"):
            continue
        try:
            with open(path, "rb") as fh:
                tree = ast.parse(fh.read(), path)
        except (OSError, SyntaxError, ValueError):
            continue
        for node in tree.body:
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.add(node.module)
    return sorted(m for m in found if m == "airflow" or m.startswith("airflow."))


def pre_import(modules):
    """Import, once in the parent, what every forked child would otherwise import again."""
    for name in modules:
        try:
            importlib.import_module(name)
        except BaseException:  # a broken import is reported by the child that needs it
            pass


def new_bag(DagBag, folder):
    params = inspect.signature(DagBag.__init__).parameters
    kwargs = {"dag_folder": folder, "collect_dags": False}
    if "include_examples" in params:
        kwargs["include_examples"] = False
    return DagBag(**kwargs)


def error_from_traceback(text, path):
    text = text.rstrip()
    lines = text.splitlines()
    kind, message = "ImportError", lines[-1] if lines else ""
    for candidate in reversed(lines):
        m = EXC_LINE.match(candidate)
        if m:
            kind, message = m.group(1), m.group(2)
            break
    line = None
    for m in re.finditer(r'File "([^"]+)", line (\d+)', text):
        if os.path.basename(m.group(1)) == os.path.basename(path):
            line = int(m.group(2))
    return {
        "kind": kind.rsplit(".", 1)[-1],
        "message": message.strip(),
        "line": line,
        "traceback": text,
    }


def import_one(DagBag, folder, path):
    """Import one DAG file the way Airflow does; what it found, as a dict."""
    del LOOKUPS[:]
    result = {}
    try:
        bag = new_bag(DagBag, folder)
        dags = bag.process_file(path, only_if_updated=False, safe_mode=True)
        result["dags"] = sorted(d.dag_id for d in dags)
        result["errors"] = [v for v in bag.import_errors.values()]
    except BaseException as exc:  # SystemExit and KeyboardInterrupt included
        if isinstance(exc, SystemExit):
            tb = "SystemExit: the file called sys.exit(%r) while being imported" % (exc.code,)
        else:
            tb = traceback.format_exc()
        result["errors"] = [tb]
        result.setdefault("dags", [])
    result["lookups"] = LOOKUPS[:100]
    return result


def worker(DagBag, folder, task_r, res_w, out_w):
    """A forked worker: import each file the parent names, answer with one JSON line."""
    os.dup2(out_w, 1)
    os.dup2(out_w, 2)
    # A Python-level handler for a fatal signal returns into the faulting
    # instruction forever; with the default action the worker dies, and the file
    # that crashed it is named.
    try:
        faulthandler.disable()
    except ImportError:
        pass
    fatal = set()
    for name in ("SIGSEGV", "SIGBUS", "SIGFPE", "SIGILL", "SIGABRT"):
        if hasattr(signal, name):
            fatal.add(getattr(signal, name))
            signal.signal(getattr(signal, name), signal.SIG_DFL)
    real_signal = signal.signal

    def keep_fatal_default(signum, handler):
        # Airflow's importer installs a SIGSEGV handler per file; for a real fault
        # in C code it never lets the process die, so the worker would spin.
        if signum in fatal:
            return signal.SIG_DFL
        return real_signal(signum, handler)

    signal.signal = keep_fatal_default
    pending = b""
    while True:
        while b"\n" not in pending:
            chunk = os.read(task_r, 4096)
            if not chunk:
                os._exit(0)
            pending += chunk
        line, pending = pending.split(b"\n", 1)
        result = import_one(DagBag, folder, line.decode("utf-8"))
        sys.stdout.flush()
        sys.stderr.flush()
        view = memoryview(json.dumps(result).encode() + b"\n")
        while view:
            n = os.write(res_w, view)
            view = view[n:]


class Job(object):
    def __init__(self, path, deadline):
        self.path = path
        self.deadline = deadline
        self.started = time.monotonic()
        self.output = bytearray()
        self.output_bytes = 0
        self.result = b""
        self.status = None
        self.timed_out = False
        self.finished = None


class Worker(object):
    def __init__(self, pid, task_w, res_r, out_r):
        self.pid = pid
        self.task_w = task_w
        self.res_r = res_r
        self.out_r = out_r
        self.buf = b""
        self.job = None
        self.dead = False


def spawn(DagBag, folder, sel, others):
    task_r, task_w = os.pipe()
    res_r, res_w = os.pipe()
    out_r, out_w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        # Only our own pipes: a copy of another worker's task pipe would keep it
        # from ever seeing the end of its work.
        for fd in [task_w, res_r, out_r] + [
            f for w in others for f in (w.task_w, w.res_r, w.out_r)
        ]:
            try:
                os.close(fd)
            except OSError:
                pass
        try:
            worker(DagBag, folder, task_r, res_w, out_w)
        finally:
            os._exit(70)
    for fd in (task_r, res_w, out_w):
        os.close(fd)
    w = Worker(pid, task_w, res_r, out_r)
    sel.register(res_r, selectors.EVENT_READ, (w, "res"))
    sel.register(out_r, selectors.EVENT_READ, (w, "out"))
    return w


def forget(w, sel):
    """Stop watching a worker's pipes and close our ends of them."""
    for fd in (w.res_r, w.out_r, w.task_w):
        try:
            sel.unregister(fd)
        except (KeyError, ValueError):
            pass
        try:
            os.close(fd)
        except OSError:
            pass
    w.dead = True


def retire(w, sel, kill=False):
    """Forget a worker (killing it if asked); return its exit status."""
    if kill:
        try:
            os.kill(w.pid, signal.SIGKILL)
        except OSError:
            pass
    forget(w, sel)
    try:
        return os.waitpid(w.pid, 0)[1]
    except ChildProcessError:
        return 0


def read_ready(key, sel, finish, assign):
    """Take what one worker pipe has: its file's output, or its verdicts (one per line)."""
    w, which = key.data
    if w.dead:
        return
    chunk = os.read(key.fd, 65536)
    if which == "out":
        if not chunk:
            try:
                sel.unregister(key.fd)
            except (KeyError, ValueError):
                pass
        elif w.job is not None:
            w.job.output_bytes += len(chunk)
            if len(w.job.output) < OUTPUT_KEEP:
                w.job.output += chunk[: OUTPUT_KEEP - len(w.job.output)]
        return
    if not chunk:  # the worker is gone: its file ended it
        finish(w, status=retire(w, sel))
        return
    w.buf += chunk
    while b"\n" in w.buf and w.job is not None:
        line, w.buf = w.buf.split(b"\n", 1)
        finish(w, result=line)
        assign(w)


def reap(workers, sel, finish):
    """End the jobs of workers past their file's deadline, or dead behind a grandchild."""
    now = time.monotonic()
    for w in workers:
        if w.dead or w.job is None:
            continue
        if now > w.job.deadline:
            w.job.timed_out = True
            finish(w, status=retire(w, sel, kill=True))
            continue
        got, status = os.waitpid(w.pid, os.WNOHANG)
        if got == w.pid:  # died while a grandchild holds its pipes
            forget(w, sel)
            finish(w, status=status)


def run_all(DagBag, folder, files, parallel, timeout):
    """Import every file in a pool of warmed workers (Airflow already imported).

    A worker imports file after file, so a fork is paid per worker, not per file.
    A file that ends, crashes or hangs its worker gets that as its verdict and a
    fresh worker takes over the rest.
    """
    sel = selectors.DefaultSelector()
    pending = list(files)
    workers = []
    done = {}

    def assign(w):
        if pending and not w.dead:
            w.job = Job(pending.pop(0), time.monotonic() + timeout)
            os.write(w.task_w, (w.job.path + "\n").encode("utf-8"))

    def finish(w, status=None, result=b""):
        job, w.job = w.job, None
        if job is not None:
            job.status, job.result, job.finished = status, result, time.monotonic()
            done[job.path] = job

    while pending or any(w.job for w in workers):
        workers = [w for w in workers if not w.dead]
        while pending and len(workers) < parallel:
            w = spawn(DagBag, folder, sel, workers)
            workers.append(w)
            assign(w)
        for key, _ in sel.select(timeout=0.05):
            read_ready(key, sel, finish, assign)
        reap(workers, sel, finish)
    for w in workers:
        if not w.dead:
            retire(w, sel, kill=True)
    return done


def verdict(job, timeout):
    entry = {
        "dags": [],
        "seconds": round((job.finished or time.monotonic()) - job.started, 3),
        "output_bytes": job.output_bytes,
        "output": job.output.decode("utf-8", "replace"),
    }
    if job.timed_out:
        entry["error"] = {
            "kind": "Timeout",
            "line": None,
            "traceback": "",
            "message": "did not finish importing within %d s" % timeout,
        }
        return entry
    status = job.status or 0
    result = None
    if job.result:
        try:
            result = json.loads(job.result.decode())
        except ValueError:
            result = None
    if result is None:
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else sig
            why = {
                "SIGKILL": " (out of memory: the check container's memory limit)",
                "SIGSEGV": " (a segmentation fault)",
            }.get(str(name), "")
            msg = "the import was killed by %s%s" % (name, why)
            entry["error"] = {"kind": "Crash", "message": msg, "line": None, "traceback": ""}
        else:
            code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else status
            msg = "the file ended the process (exit status %s) while being imported" % code
            entry["error"] = {"kind": "Exit", "message": msg, "line": None, "traceback": ""}
        return entry
    entry["dags"] = result.get("dags", [])
    entry["lookups"] = result.get("lookups", [])
    errors = result.get("errors") or []
    if errors:
        entry["error"] = error_from_traceback(errors[0], job.path)
    return entry


def judge(files, done, home, allowed, timeout):
    """Each file's entry of the report, in Airflow's own order (duplicate dag_ids named)."""
    out = {}
    owners = {}  # dag_id -> the file that defined it first, in Airflow's own order
    for path in files:
        rel = os.path.relpath(path, home)
        entry = verdict(done[path], timeout)
        for dag_id in entry["dags"]:
            if dag_id in owners and "error" not in entry:
                # Each file is imported on its own, so the DagBag's cross-file check is ours.
                entry["error"] = {
                    "kind": "AirflowDagDuplicatedIdException",
                    "line": None,
                    "traceback": "",
                    "message": "dag_id %r is already defined in %s" % (dag_id, owners[dag_id]),
                }
            owners.setdefault(dag_id, rel)
        entry["status"] = "ok"
        if "error" in entry:
            entry["status"] = "allowed" if os.path.normpath(rel) in allowed else "error"
        out[rel] = entry
        say(
            "%-5s %s (%s)"
            % (
                entry["status"],
                rel,
                ("%d DAGs" % len(entry["dags"]))
                if entry["status"] == "ok"
                else entry["error"]["kind"],
            )
        )
    return out


def main():
    cfg = json.loads(os.environ["DEPLOYD_CHECK"])
    home = cfg.get("project") or os.getcwd()
    folder = os.path.join(home, "dags")
    started = time.monotonic()
    report = {"files": {}, "airflow_version": None, "fatal": None}
    try:
        import airflow

        report["airflow_version"] = getattr(airflow, "__version__", "unknown")
        DagBag = dagbag_class()
        files = discover(folder) if os.path.isdir(folder) else []
    except BaseException:
        report["fatal"] = (
            "Airflow could not be loaded in the image:\n" + traceback.format_exc()[-4000:]
        )
        sys.stdout.write(RESULT_MARK + json.dumps(report) + "\n")
        return 0
    say(
        "Airflow %s loaded in %.2f s; %d DAG files to check"
        % (report["airflow_version"], time.monotonic() - started, len(files))
    )
    PROJECT[0] = os.path.join(os.path.realpath(home), "")
    install_placeholders()
    pre_import(airflow_imports(files))
    allowed = load_exceptions(home)
    done = run_all(
        DagBag, folder, files, max(1, int(cfg.get("parallel", 1))), int(cfg["import_timeout"])
    )
    report["files"] = judge(files, done, home, allowed, int(cfg["import_timeout"]))
    report["seconds"] = round(time.monotonic() - started, 3)
    sys.stdout.write(RESULT_MARK + json.dumps(report) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip the interpreter's teardown: with Airflow loaded it takes about half a second.
    os._exit(code)
