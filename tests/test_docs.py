"""Every snippet of the README and the docs that can run, runs.

Each page (``README.md``, ``docs/**/*.md``) is played in a fresh temporary
directory (with copies of ``demos/`` and ``hardware_configs/``, ``CI=true``),
its fenced blocks in page order, as a reader would:

- ``python`` blocks are executed in one namespace per page; a failure names
  the page and the line of the snippet (the traceback points into the page);
- a block with ``title="NAME"`` (``python``, ``yaml``, ...) is written to the
  file NAME instead (what a reader saves before running the next block);
- ``bash`` blocks: each ``smartscope ...`` command line is run (in the page's
  process) when it is cheap (``validate``, ``demo``, ``report``, ``segment``,
  ``export``, ``--help``, ``--version``) and must exit 0; any other
  ``smartscope`` command (long runs, benchmarks, training) is parsed against
  the real command line (the command, its options and their values must exist
  and be valid) but not run;
- ``yaml`` blocks without a title whose keys are experiment keys are checked
  as an experiment (a fragment is merged into a minimal experiment) with
  `Experiment.from_file`: unknown keys and bad values fail.

A block that cannot run here (a real microscope, a remote cluster) has the
comment ``<!-- no-test: REASON -->`` on the line before its fence; those are
counted, and must give their reason.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
NO_TEST = re.compile(r"^<!--\s*no-test(?::\s*(?P<reason>.*?))?\s*-->$")
TITLE = re.compile(r'title="(?P<title>[^"]+)"')
CHEAP = {"validate", "demo", "report", "segment", "export"}


@dataclass
class Snippet:
    page: str  # relative to the repository root
    line: int  # line of the first code line (1-based)
    lang: str
    title: str | None
    code: str
    no_test: str | None  # the reason, when marked

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def snippets(path: Path) -> list[Snippet]:
    """The fenced code blocks of a markdown file."""
    rel = path.relative_to(ROOT).as_posix()
    lines = path.read_text(encoding="utf-8").splitlines()
    out: list[Snippet] = []
    previous = ""  # the last non-blank line before a fence
    k = 0
    while k < len(lines):
        m = FENCE.match(lines[k])
        if m is None:
            if lines[k].strip():
                previous = lines[k].strip()
            k += 1
            continue
        indent, fence, info = m["indent"], m["fence"], m["info"].strip()
        start = k + 1
        k += 1
        body = []
        while k < len(lines) and not lines[k].strip().startswith(fence):
            text = lines[k]
            body.append(text[len(indent) :] if text.startswith(indent) else text)
            k += 1
        k += 1  # the closing fence
        marker = NO_TEST.match(previous)
        title = TITLE.search(info)
        out.append(
            Snippet(
                page=rel,
                line=start + 1,
                lang=(info.split() or [""])[0].strip("{}.").lower(),
                title=title["title"] if title else None,
                code="\n".join(body) + "\n",
                no_test=(marker["reason"] or "") if marker else None,
            )
        )
        previous = ""
    return out


ENV = re.compile(r"^[A-Z_][A-Z0-9_]*=")


def commands(snippet: Snippet) -> list[tuple[dict[str, str], list[str]]]:
    """The ``smartscope`` commands of a bash block: (environment, arguments).

    ``PYTHONPATH=. smartscope run x.yaml`` gives ``({"PYTHONPATH": "."},
    ["run", "x.yaml"])``; other commands (pip, napari, dask) are left out.
    """
    text = re.sub(r"\\\n", " ", snippet.code)  # continued lines
    out = []
    for line in text.splitlines():
        try:
            words = shlex.split(line, comments=True)
        except ValueError as e:
            raise AssertionError(
                f"{snippet.where}: cannot parse {line!r}: {e}"
            ) from None
        command: list[str] = []
        for word in [*words, "&&"]:
            if word not in ("&&", "||", ";", "&", "|"):
                command.append(word)
                continue
            n = 0
            while n < len(command) and ENV.match(command[n]):
                n += 1
            if command[n : n + 1] == ["smartscope"]:
                env = dict(w.split("=", 1) for w in command[:n])
                out.append((env, command[n + 1 :]))
            command = []
    return out


def is_cheap(args: list[str]) -> bool:
    return (
        not args
        or "--help" in args
        or args[0] == "--version"
        or (args[0] in CHEAP and "--help" not in args)
    )


# ------------------------------------------------------------ the page player
def _parse_command(args: list[str]) -> None:
    """Parse `args` as the real ``smartscope`` command line would (no run)."""
    import typer

    from smartscope.cli import app

    cmd = typer.main.get_command(app)
    info, rest = "smartscope", list(args)
    while True:
        ctx = cmd.make_context(info, rest)
        if not hasattr(cmd, "list_commands"):
            return
        rest = [*ctx._protected_args, *ctx.args]
        if not rest:
            return
        name = rest.pop(0)
        sub = cmd.get_command(ctx, name)
        if sub is None:
            raise ValueError(f"no command {info} {name}")
        cmd, info = sub, f"{info} {name}"


MINIMAL_SEQUENCE = {"channels": [{"config": "DAPI", "exposure": 10}]}


def _check_yaml(snippet: Snippet, n: int) -> bool:
    """Check an experiment (or a fragment of one); False if it is not one."""
    import yaml

    from smartscope.experiment import Experiment

    data = yaml.safe_load(snippet.code)
    if not isinstance(data, dict) or not set(data) <= set(Experiment.model_fields):
        return False
    data.setdefault("sequence", MINIMAL_SEQUENCE)
    path = Path(f"_snippet_{n}.yaml")
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    Experiment.from_file(path)
    return True


def play(page: str) -> int:
    """Run the snippets of `page` in the working directory; print a tally."""
    import traceback

    sys.path.insert(0, os.getcwd())
    namespace: dict[str, object] = {"__name__": "__main__"}
    counts = {"python": 0, "files": 0, "run": 0, "parsed": 0, "yaml": 0}
    for n, snippet in enumerate(snippets(ROOT / page)):
        if snippet.no_test is not None:
            continue
        try:
            if snippet.title:
                Path(snippet.title).parent.mkdir(parents=True, exist_ok=True)
                Path(snippet.title).write_text(snippet.code, encoding="utf-8")
                counts["files"] += 1
            elif snippet.lang in ("python", "py"):
                source = "\n" * (snippet.line - 1) + snippet.code
                exec(compile(source, snippet.page, "exec"), namespace)
                counts["python"] += 1
            elif snippet.lang in ("bash", "sh", "shell", "console"):
                for env, args in commands(snippet):
                    if is_cheap(args):
                        _run_command(args, env)
                        counts["run"] += 1
                    else:
                        _parse_command(args)
                        counts["parsed"] += 1
            elif snippet.lang in ("yaml", "yml"):
                counts["yaml"] += _check_yaml(snippet, n)
        except BaseException as e:
            if isinstance(e, SystemExit) and e.code in (0, None):
                continue
            traceback.print_exc()
            print(f"\n{snippet.where}: {snippet.lang} snippet failed: {e}")
            return 1
    print(" ".join(f"{k}={v}" for k, v in counts.items()))
    return 0


def _run_command(args: list[str], env: dict[str, str]) -> None:
    """Run ``smartscope ARGS`` in this process (torch is imported once a page)."""
    from smartscope.cli import app

    os.environ.update(env)  # PYTHONPATH=. : the working directory is on sys.path
    try:
        code = app(args=args, prog_name="smartscope", standalone_mode=False)
    except SystemExit as e:
        code = e.code
    if code not in (0, None):
        raise RuntimeError(f"`smartscope {shlex.join(args)}` exited {code}")


# ----------------------------------------------------------------- the tests
def _pages_with_snippets() -> list[str]:
    return [
        p.relative_to(ROOT).as_posix()
        for p in pages()
        if any(s.no_test is None for s in snippets(p))
    ]


def _workdir(tmp_path: Path) -> Path:
    for name in ("demos", "hardware_configs"):
        shutil.copytree(
            ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("*.png")
        )
    return tmp_path


def test_docs_exist():
    assert (ROOT / "README.md").is_file()
    assert (ROOT / "mkdocs.yml").is_file()
    assert len(pages()) > 10


def test_marked_snippets_say_why():
    marked = [s for p in pages() for s in snippets(p) if s.no_test is not None]
    for s in marked:
        assert s.no_test, f"{s.where}: <!-- no-test: REASON --> needs its reason"
    runnable = [s for p in pages() for s in snippets(p) if s.no_test is None]
    python = [s for s in runnable if s.lang == "python" and not s.title]
    print(
        f"\n{len(runnable)} snippets played ({len(python)} python), "
        f"{len(marked)} marked no-test:"
    )
    for s in marked:
        print(f"  {s.where}: {s.no_test}")
    assert python, "no python snippet found"


def test_bash_blocks_name_real_commands():
    """Every smartscope command in the docs parses (also those marked)."""
    failures = []
    for page in pages():
        for s in snippets(page):
            if s.lang not in ("bash", "sh", "shell", "console"):
                continue
            for _, args in commands(s):
                if "--help" in args or args[:1] == ["--version"]:
                    continue
                try:
                    _parse_command(args)
                except BaseException as e:
                    failures.append(f"{s.where}: smartscope {shlex.join(args)}: {e}")
    assert not failures, "\n".join(failures)


def pytest_generate_tests(metafunc):
    if "page" in metafunc.fixturenames:
        metafunc.parametrize("page", _pages_with_snippets())


def test_snippets_run(page, tmp_path):
    env = {**os.environ, "CI": "true", "QT_QPA_PLATFORM": "offscreen"}
    proc = subprocess.run(
        [sys.executable, __file__, page],
        cwd=_workdir(tmp_path),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"{page}:\n{proc.stdout[-6000:]}{proc.stderr[-6000:]}"


if __name__ == "__main__":
    sys.exit(play(sys.argv[1]))
