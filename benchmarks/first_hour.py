"""Issue 26's first hour, as a new user meets it: each item run against one checkout, in a scratch folder.

    python benchmarks/first_hour.py CHECKOUT --python PYTHON [--work DIR] [--items 1,5]

The CLI runs as ``PYTHONPATH=CHECKOUT PYTHON -m florence_cli ...`` (so an old checkout and a new one can
share a venv), with HOME an empty folder, ``HF_HUB_OFFLINE=1`` and the tiny model that ``florence
make-tiny-model`` writes. Terminal behaviour is checked on a real terminal (a pseudo-terminal of 80
columns, Ctrl-C typed into it) and in a log (stderr to a file). Each check prints
``item N (title): REPRODUCED|FIXED|UNCLEAR`` and its evidence: the command and the lines that decide.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import select
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import termios
import time
from dataclasses import dataclass, field
from pathlib import Path

MANY = 400  # images in many/, the folder of the progress items


@dataclass
class Ran:
    """One command's run: its words, exit status, output and time."""

    args: list[str]
    code: int
    out: str
    err: str
    seconds: float
    events: list[tuple[float, str]] = field(default_factory=list)  # (time, text) read from a terminal

    def lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


class Walk:
    """A scratch folder, and the CLI of one checkout run in it as a new user would."""

    def __init__(self, checkout: Path, python: str, work: Path):
        self.checkout, self.python, self.work = checkout.resolve(), python, work.resolve()
        self.home = self.work / "home"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("FLORENCE_", "HF_", "PYTHON"))},
            "HOME": str(self.home),
            "PYTHONPATH": str(self.checkout),
            "HF_HUB_OFFLINE": "1",
            "TERM": "xterm",
        }

    def cli(self, *args: str, env: dict | None = None, stdin: str | None = None, timeout: float = 300) -> Ran:
        """``florence ARGS`` with stderr and stdout to pipes (not a terminal)."""
        return self.run([self.python, "-m", "florence_cli", *args], env, stdin, timeout)

    def run(self, argv: list[str], env: dict | None = None, stdin: str | None = None, timeout: float = 300):
        start = time.monotonic()
        done = subprocess.run(
            argv,
            cwd=self.work,
            env={**self.env, **(env or {})},
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        return Ran(argv, done.returncode, done.stdout, done.stderr, time.monotonic() - start)

    def py(self, code: str) -> None:
        """Run ``code`` with the checkout's Python (images and models are made with its packages)."""
        ran = self.run([self.python, "-c", code])
        if ran.code:
            raise SystemExit(f"setting up failed: {ran.err.strip().splitlines()[-1:]}")

    def tty(self, *args: str, env: dict | None = None, ctrl_c_when=None, timeout: float = 300) -> Ran:
        """``florence ARGS`` on a pseudo-terminal (stdin, stdout and stderr, 80x24, its controlling
        terminal); ``ctrl_c_when(text so far)`` true types Ctrl-C into it, once."""
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
        argv = [self.python, "-m", "florence_cli", *args]
        start = time.monotonic()
        child = subprocess.Popen(
            argv,
            cwd=self.work,
            env={**self.env, **(env or {})},
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
        )
        os.close(slave)
        events, text, typed = [], "", False
        while True:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(master, 65536).decode("utf-8", "replace")
                except OSError:  # the terminal's last writer is gone
                    break
                if not chunk:
                    break
                events.append((time.monotonic() - start, chunk))
                text += chunk
            if ctrl_c_when and not typed and ctrl_c_when(text):
                os.write(master, b"\x03")
                typed = True
            if time.monotonic() - start > timeout:
                child.kill()
        os.close(master)
        code = child.wait()
        return Ran(argv, code, "", text, time.monotonic() - start, events)

    def logged(self, *args: str, env: dict | None = None, interrupt_when=None, timeout: float = 60) -> Ran:
        """``florence ARGS`` with stderr to a file, as under nohup or Slurm; SIGINT once
        ``interrupt_when(the log so far)`` is true, or after ``timeout`` seconds."""
        argv = [self.python, "-m", "florence_cli", *args]
        log = self.work / "stderr.log"
        start = time.monotonic()
        with open(log, "w") as err:
            child = subprocess.Popen(
                argv,
                cwd=self.work,
                env={**self.env, **(env or {})},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
            while child.poll() is None:
                if time.monotonic() - start > timeout or (interrupt_when and interrupt_when(log.read_text())):
                    child.send_signal(signal.SIGINT)
                    break
                time.sleep(0.1)
            code = child.wait(timeout=120)
        return Ran(argv, code, "", log.read_text(), time.monotonic() - start)

    # -- the scratch folder ------------------------------------------------------------------------
    def set_up(self) -> None:
        """An empty HOME, the tiny model, and the image folders the items use."""
        shutil.rmtree(self.work, ignore_errors=True)
        self.home.mkdir(parents=True)
        made = self.cli("make-tiny-model", "tiny-model")
        if made.code:
            raise SystemExit(f"florence make-tiny-model failed: {made.err.strip()}")
        samples = self.checkout / "sample_images"
        shutil.copytree(samples, self.work / "imgs")
        shutil.copytree(samples, self.work / "train")
        self.py(MAKE_IMAGES.format(many=MANY))
        self.py(MAKE_MODELS.format(tilt=TILT))


MAKE_IMAGES = """
import random, tarfile, io
from pathlib import Path
from PIL import Image
Path("other").mkdir(); Image.new("RGB", (123, 45), "red").save("other/street.jpg")
Image.new("RGB", (60, 80), "blue").save("other/extra.png")
Path("many").mkdir()
for i in range({many}):
    colour = tuple(random.Random(i * 3 + c).randrange(256) for c in range(3))
    Image.new("RGB", (64, 48), colour).save(f"many/{{i:04}}.jpg")
Path("shards").mkdir()
for s in range(4):
    with tarfile.open(f"shards/{{s:05}}.tar", "w") as tar:
        for k in range(2):
            data = io.BytesIO(); Image.new("RGB", (40, 30), (s * 60, k * 90, 9)).save(data, "JPEG")
            info = tarfile.TarInfo(f"{{s:05}}{{k:04}}.jpg"); info.size = data.tell(); data.seek(0)
            tar.addfile(info, data)
Path("bad").mkdir(); whole = Path("imgs/street.jpg").read_bytes()
Path("bad/cut.jpg").write_bytes(whole[: len(whole) // 2]); Path("empty").mkdir()
"""
# Two tiny models steered by one seeded tilt of the output layer (florence_cli.testing.tiny's, in both
# checkouts): "empty-model" ends every answer at once; "nl-model" puts line breaks inside its answers.
TILT = """
def tilt(model, token, strength, seed=1):
    decoder = model.model.language_model.decoder
    bias = decoder.layers[-1].final_layer_norm.bias
    direction = torch.randn(bias.shape, generator=torch.Generator().manual_seed(seed))
    direction /= direction.norm()
    with torch.no_grad():
        spread = float(model.lm_head.weight.std()) * bias.numel() ** 0.5
        bias += direction
        model.lm_head.weight[token] += strength * spread * direction
"""
MAKE_MODELS = """
import torch
from florence_cli.testing.tiny import build_random, tilt_towards_eos
{tilt}
steering = {{"empty-model": lambda m: tilt_towards_eos(m, 50), "nl-model": lambda m: tilt(m, 202, 2)}}
for folder, steer in steering.items():
    model, processor = build_random(folder)
    steer(model)
    model.save_pretrained(folder); processor.save_pretrained(folder)
"""


# -- reporting ---------------------------------------------------------------------------------------
def verdict(number: str, title: str, bug: bool, fixed: bool, *evidence: Ran | str) -> bool:
    """Print one item's line and its evidence; returns whether it is fixed."""
    word = "REPRODUCED" if bug and not fixed else "FIXED" if fixed and not bug else "UNCLEAR"
    print(f"item {number} ({title}): {word}")
    for piece in evidence:
        if isinstance(piece, Ran):
            shown = [shlex.quote(a) for a in piece.args]
            shown = ["florence", *shown[3:]] if shown[1:3] == ["-m", "florence_cli"] else shown
            print(f"    $ {' '.join(shown)}   # exit {piece.code}, {piece.seconds:.1f} s")
        else:
            for line in str(piece).splitlines():
                print(f"      {line[:300]}")
    sys.stdout.flush()
    return fixed and not bug


def tail(text: str, n: int = 3) -> str:
    lines = [clean(line) for line in re.split(r"[\r\n]+", text) if clean(line).strip()]
    return "\n".join(lines[-n:])


def clean(text: str) -> str:
    """A terminal's text without its escape sequences."""
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)


def coco_sizes(path: Path) -> dict[str, tuple[int, int]]:
    coco = json.loads(path.read_text())
    return {image["file_name"]: (image["width"], image["height"]) for image in coco["images"]}


def images_done(text: str) -> int:
    """How many images the last progress bar in ``text`` counts (``16/400 [`` or ``16img [``)."""
    counts = re.findall(r"(\d+)(?:/\d+ \[|img \[)", clean(text))
    return int(counts[-1]) if counts else 0


def others(frames: list[str]) -> list[str]:
    """A terminal's lines that are not progress bars (say, an exception Python ignored)."""
    return [f for f in frames if not re.search(r"\d+(/\d+)? ?\[|img \[|^\s*\d+%", f)][:20]


def journal_lines(out: Path) -> int:
    journal = out / ".florence" / "journal.jsonl"
    return len(journal.read_text().splitlines()) if journal.exists() else 0


# -- the items -----------------------------------------------------------------------------------
def item_1(w: Walk) -> None:
    """One dataset per output folder (the default -o florence-out)."""
    first = w.cli("annotate", "imgs", "-t", "OD", "-t", "CAPTION", "-m", "tiny-model")
    second = w.cli("annotate", "other", "-t", "OD", "-m", "tiny-model")
    sizes = coco_sizes(w.work / "florence-out" / "od.json")
    mixed = second.code == 0 and sizes.get("street.jpg") == (123, 45)
    refused = second.code == 2 and len(second.lines()) == 1 and "other" in second.err
    verdict(
        "1a",
        "second dataset into florence-out",
        mixed,
        refused and sizes["street.jpg"] == (640, 427),
        first,
        second,
        tail(second.err),
        f"od.json: {len(sizes)} images, street.jpg {sizes.get('street.jpg')}",
    )
    viz = w.cli("viz", "florence-out/od.json", "--images", "imgs", "-o", "viz1")
    verdict(
        "1b", "viz of florence-out on imgs", viz.code != 0, viz.code == 0, viz, tail(viz.err + viz.out, 2)
    )
    w.cli("annotate", "imgs", "-t", "CAPTION", "-t", "OCR", "-m", "tiny-model", "-o", "meta")
    train = w.cli("annotate", "train", "-t", "CAPTION", "--hf-metadata", "-m", "tiny-model", "-o", "meta")
    metadata = w.work / "train" / "metadata.jsonl"
    rows = [json.loads(line) for line in metadata.read_text().splitlines()] if metadata.exists() else []
    leaked = any("ocr" in row for row in rows)
    verdict(
        "1c",
        "another run's column in metadata.jsonl",
        leaked,
        train.code == 2 and not leaked,
        "$ florence annotate imgs -t CAPTION -t OCR -m tiny-model -o meta",
        train,
        tail(train.err, 2),
        f"train/metadata.jsonl columns: {sorted({k for row in rows for k in row}) or 'no file'}",
    )


def item_2(w: Walk) -> None:
    """Resume recognises the model however spelled; refusals name what differs."""
    w.cli("annotate", "imgs", "-t", "OD", "-m", "tiny-model", "-o", "m2")
    for number, spelling in (
        ("2a", "./tiny-model"),
        ("2b", str(w.work / "tiny-model")),
        ("2c", "tiny-model/"),
    ):
        again = w.cli("annotate", "imgs", "-t", "OD", "-m", spelling, "-o", "m2")
        resumed = again.code == 0 and "5 already done" in again.err
        verdict(number, f"resume with -m {spelling}", again.code == 2, resumed, again, tail(again.err, 1))
    beams = w.cli("annotate", "imgs", "-t", "OD", "-m", "tiny-model", "-o", "m2", "--num-beams", "1")
    named = "num_beams: 3 → 1" in beams.err
    keeps = "another output folder" in beams.err and beams.err.find("another output folder") < beams.err.find(
        "--overwrite"
    )
    verdict(
        "2d",
        "refusal names the difference, remedies before --overwrite",
        beams.code == 2 and not named,
        beams.code == 2 and named and keeps,
        beams,
        tail(beams.err, 1),
    )
    batched = w.cli("annotate", "imgs", "-t", "OD", "-m", "tiny-model", "-o", "m2", "--batched-products")
    verdict(
        "2e",
        "--batched-products refusal names products",
        batched.code == 2 and "products" not in batched.err,
        batched.code == 2 and "products:" in batched.err,
        batched,
        tail(batched.err, 1),
    )


def item_3(w: Walk) -> None:
    """The README's Python API example, pasted into a script (model and device made local)."""
    readme = (w.checkout / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "Annotator" in b)
    script = re.sub(r'"(microsoft|mrhendrey)/Florence-2[^"]*"', '"tiny-model"', block)
    script = script.replace('device="cuda"', 'device="cpu"').replace('"a.jpg"', '"imgs/street.jpg"')
    script = script.replace('"b.jpg"', '"imgs/text.png"')
    (w.work / "pasted.py").write_text(script)
    pasted = w.run([w.python, "pasted.py"], timeout=400)
    tracebacks = pasted.err.count("Traceback")
    evidence = [f"pasted.py: {len(script.splitlines())} lines, guard: {'__main__' in script}", pasted]
    verdict(
        "3a",
        "README's API example as pasted",
        pasted.code != 0 or tracebacks > 0,
        pasted.code == 0 and tracebacks == 0,
        *evidence,
        f"{tracebacks} tracebacks",
        tail(pasted.err + pasted.out, 2),
    )
    unguarded = re.sub(r'if __name__ == "__main__":\n', "", script)
    unguarded = "\n".join(line[4:] if line.startswith("    ") else line for line in unguarded.splitlines())
    (w.work / "unguarded.py").write_text(unguarded.replace('"out"', '"out-unguarded"'))
    bare = w.run([w.python, "unguarded.py"], timeout=400)
    tracebacks = bare.err.count("Traceback")
    verdict(
        "3b",
        "the same without the main guard (workers=4)",
        tracebacks > 1 or bare.seconds > 60,
        tracebacks <= 1 and bare.seconds < 60 and "__main__" in bare.err,
        bare,
        f"{tracebacks} tracebacks",
        tail(bare.err, 1),
    )


def item_4(w: Walk) -> None:
    """--jsonl - | jq on a rerun."""
    command = f"{w.python} -m florence_cli annotate imgs -t CAPTION -m tiny-model -o j4 --jsonl - -q"
    pipeline = f"{command} | jq -r .result"
    if not shutil.which("jq"):
        pipeline = pipeline.replace("jq -r .result", "cat")
    first = w.run(["bash", "-c", pipeline])
    rerun = w.run(["bash", "-c", pipeline])
    lines = len(rerun.out.splitlines())
    verdict(
        "4",
        "--jsonl - on a rerun",
        lines == 0,
        lines == 5,
        first,
        f"{len(first.out.splitlines())} lines",
        rerun,
        f"{lines} lines",
    )


def item_5(w: Walk) -> None:
    """Progress on a terminal, in a log, at Ctrl-C; missing shards."""
    many = ("annotate", "many", "-t", "CAPTION", "--max-new-tokens", "8", "-m", "tiny-model")
    bar = w.tty(*many, "-o", "p-tty", ctrl_c_when=lambda text: images_done(text) >= 16)
    frames = [clean(f) for f in re.split(r"[\r\n]+", bar.err) if clean(f).strip()]
    frame = next((f for f in reversed(frames) if re.search(r"\d+img|\d+/\d+", f)), "")
    has_total = f"/{MANY}" in frame and "%" in frame and "<" in frame  # tqdm's ETA follows a <
    verdict(
        "5a",
        "terminal bar: total, percentage, ETA",
        not has_total,
        has_total,
        bar,
        f"last bar: {frame.strip()}",
    )
    loading = next((t for t, text in bar.events if "loading" in text), None)
    first_done = next((t for t, text in bar.events if images_done(text) > 0), None)
    verdict(
        "5b",
        "a line while the model loads",
        loading is None,
        loading is not None,
        f"first output at {bar.events[0][0]:.1f} s: {clean(bar.events[0][1]).strip()!r}",
        f"'loading' line at {loading if loading is None else round(loading, 1)} s; first image done at "
        f"{first_done if first_done is None else round(first_done, 1)} s",
    )
    ctrl_c = next((f for f in reversed(frames) if "done" in f or "interrupt" in f.lower()), frames[-1])
    says_total = str(MANY) in ctrl_c and "found so far" not in ctrl_c
    verdict(
        "5c",
        "Ctrl-C's line counts the inputs",
        not says_total,
        says_total and bar.code == 130,
        f"Ctrl-C typed into the terminal at 16 images: exit {bar.code}",
        ctrl_c,
        *([] if bar.code == 130 else ["not stopped; the terminal's other lines:", *others(frames)]),
    )
    env = {"FLORENCE_PROGRESS_EVERY": "1"}

    def two_lines(text: str) -> bool:
        return len(re.findall(r"^florence: \d+", text, re.M)) >= 2

    log = w.logged(*many, "-o", "p-log", env=env, interrupt_when=two_lines, timeout=40)
    periodic = [line for line in log.lines() if re.match(r"florence: \d+", line)]
    verdict(
        "5d",
        "progress lines when stderr is a file",
        not periodic,
        len(periodic) >= 2,
        log,
        "FLORENCE_PROGRESS_EVERY=1, stderr to a file, SIGINT after two progress lines or 40 s",
        f"{len(periodic)} progress lines:",
        "\n".join(periodic[:2]),
        "last: " + tail(log.err, 1),
    )
    shards = w.cli("annotate", "shards/{00000..00099}.tar", "-t", "OD", "-m", "tiny-model", "-o", "p-shards")
    summary = tail(shards.err, 1)
    as_images = re.search(r"(\d+) images?", summary)
    counted_missing = bool(as_images and int(as_images.group(1)) > 8)
    verdict(
        "5e",
        "a pattern's missing shards",
        counted_missing,
        not counted_missing and "shard" in summary,
        shards,
        f"{len(shards.lines())} stderr lines; summary: {summary}",
    )


def item_6(w: Walk) -> None:
    """Caption files."""
    shutil.copytree(w.work / "imgs", w.work / "ro")
    for path in (w.work / "ro", *(w.work / "ro").iterdir()):
        path.chmod(0o555 if path.is_dir() else 0o444)
    drop = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    argv = [*drop, w.python, "-m", "florence_cli", "annotate", "ro", "-t", "CAPTION", "--sidecar"]
    ro = w.run([*argv, "-m", "tiny-model", "-o", "cap-ro"])
    temp_named = ".florence-" in ro.err and ".tmp" in ro.err
    journaled = journal_lines(w.work / "cap-ro")
    one_line = sum("Permission denied" in line for line in ro.lines()) == 1
    verdict(
        "6a",
        "--sidecar on a read-only image folder",
        temp_named or journaled == 0,
        ro.code == 3 and one_line and "ro/" in ro.err and journaled > 0,
        ro,
        "(as root: CAP_DAC_OVERRIDE dropped, so the folder's mode holds)" if drop else "",
        tail(ro.err, 4),
        f"journal: {journaled} lines",
    )
    ledger = [p for p in (w.work / "cap-ro").rglob("*captions*")] + list(
        (w.work / "ro").glob(".florence-captions*")
    )
    listed = sum(len(p.read_text().splitlines()) for p in ledger if p.is_file())
    verdict(
        "6b",
        "the ledger lists only caption files written",
        listed > 0,
        listed == 0,
        f"ledger files: {[str(p.relative_to(w.work)) for p in ledger]}, {listed} entries",
    )
    empty = w.cli(
        "annotate", "imgs", "-t", "CAPTION", "--sidecar-dir", "cap-empty", "-m", "empty-model", "-o", "e6"
    )
    files = sorted((w.work / "cap-empty").glob("*.txt"))
    zero = [f.name for f in files if f.stat().st_size == 0]
    verdict(
        "6c",
        "an empty answer",
        bool(zero),
        not files and "empty" in empty.err,
        empty,
        f"caption files: {len(files)}, 0-byte: {len(zero)}",
        tail(empty.err, 1),
    )
    nl = w.cli(
        "annotate",
        "imgs",
        "-t",
        "CAPTION",
        "--sidecar-dir",
        "cap-nl",
        "-m",
        "nl-model",
        "--max-new-tokens",
        "20",
        "-o",
        "n6",
    )
    texts = {f.name: f.read_text() for f in sorted((w.work / "cap-nl").glob("*.txt"))}
    multi = {name: text for name, text in texts.items() if "\n" in text.strip()}
    answers = [
        r.get("raw", "")
        for r in map(json.loads, (w.work / "n6" / ".florence" / "journal.jsonl").read_text().splitlines())
    ]
    verdict(
        "6d",
        "a multi-line answer",
        bool(multi),
        texts and not multi and any("\n" in a for a in answers),
        nl,
        f"{len(texts)} caption files, {len(multi)} of more than one line: {list(multi.items())[:1]}",
        f"first caption: {next(iter(texts.values()), '')!r}",
    )
    w.cli("annotate", "imgs", "-t", "CAPTION", "--sidecar-dir", "own", "-m", "tiny-model", "-o", "own1")
    other = w.cli(
        "annotate",
        "imgs",
        "-t",
        "CAPTION",
        "--sidecar-dir",
        "own",
        "--prefix",
        "ohwx, ",
        "-m",
        "tiny-model",
        "-o",
        "own2",
    )
    kept = [line for line in other.lines() if "not written by florence-cli" in line]
    prefixed = all(f.read_text().startswith("ohwx, ") for f in (w.work / "own").glob("*.txt"))
    verdict(
        "6e",
        "caption files stay florence-cli's with another -o",
        bool(kept),
        not kept and prefixed,
        "$ florence annotate imgs -t CAPTION --sidecar-dir own -m tiny-model -o own1",
        other,
        f"{len(kept)} 'not written by florence-cli' lines",
        *kept[:1],
    )


def item_7(w: Walk) -> None:
    """The README and the help, checked on the files."""
    readme = (w.checkout / "README.md").read_text()
    words = len(readme.split())
    lines = readme.splitlines()
    recipe = re.compile(r"#+ .*(quickstart|recipes|pipelines)", re.I)  # the first section of examples
    first_recipe = next(i for i, line in enumerate(lines, 1) if recipe.match(line))
    verdict(
        "7a",
        "README length and order",
        words > 2000 or first_recipe > 60,
        words <= 1600 and first_recipe <= 60,
        f"README.md: {words} words, first recipe at line {first_recipe}",
    )
    developers = r"why no timm|\| operators|reads as its modules"  # the three examples
    dev = [line.strip()[:60] for line in lines if re.search(developers, line, re.I)]
    verdict("7b", "developer sections in the README", bool(dev), not dev, f"developer text: {dev}")
    docs = readme + "".join(p.read_text() for p in sorted((w.checkout / "docs").glob("*.md")))
    synopsis_flags = ("--prompt", "--sidecar", "--sidecar-dir", "--prefix", "--hf-metadata")
    missing = [flag for flag in synopsis_flags if flag not in docs]
    synopsis = re.search(r"```\n(florence annotate [^`]*INPUT[^`]*)```", docs)
    in_synopsis = synopsis and all(flag in synopsis.group(1) for flag in synopsis_flags)
    verdict(
        "7c",
        "the synopsis names --prompt, --sidecar*, --prefix, --hf-metadata",
        not in_synopsis,
        bool(in_synopsis) and not missing,
        f"synopsis found: {bool(synopsis)}; flags missing from it: "
        f"{[f for f in synopsis_flags if not synopsis or f not in synopsis.group(1)]}",
    )
    first = next(line for line in lines if line.startswith("florence annotate "))
    offline = "-m " in first  # the recipes after it are for the Hub's model
    verdict("7d", "the first example names -m (works offline)", not offline, offline, first)
    helped = w.cli("annotate", "--help")
    examples = "Examples" in helped.out
    verdict(
        "7e",
        "annotate --help has examples",
        not examples,
        examples,
        helped,
        f"{len(helped.out.splitlines())} lines, 'Examples' at line "
        f"{next((i for i, line in enumerate(helped.out.splitlines(), 1) if 'Examples' in line), None)}",
    )
    cpu_index = "download.pytorch.org/whl/cpu" in readme
    verdict(
        "7f",
        "the torch note for CPU-only users",
        not cpu_index,
        cpu_index,
        next((line for line in lines if "whl/cpu" in line or "torch==" in line), ""),
    )
    tests = readme[readme.find("## Tests") :] if "## Tests" in readme else ""
    cost = bool(re.search(r"\bminutes\b", tests)) and "GB" in tests
    markers = (w.checkout / "pyproject.toml").read_text()
    marked = '"slow:' in markers and '"ray:' in markers and "not slow" in tests
    verdict(
        "7g",
        "the test command's time, size and markers",
        not (cost and marked),
        cost and marked,
        f"time/size stated: {cost}; slow/ray markers: {marked}",
    )
    read_folder = re.search(r'= pd.read_parquet\("shards"\)', docs) is not None
    verdict(
        "7h",
        'pd.read_parquet("shards") on img2dataset output',
        read_folder,
        not read_folder,
        next((line.strip() for line in docs.splitlines() if "read_parquet(" in line), ""),
    )


def item_8(w: Walk) -> None:
    """The smaller ones."""
    typo = w.cli("annotate", "imgs", "-t", "OD", "-m", "tiny-modl", "-o", "s8")
    hub = re.search(r"hub|hugging", typo.err, re.I) is not None
    verdict(
        "8a",
        "-m tiny-modl",
        hub,
        not hub and "tiny-modl" in typo.err and len(typo.lines()) == 1,
        typo,
        tail(typo.err, 2),
    )
    cuda = w.cli("annotate", "imgs", "-t", "OD", "-m", "tiny-model", "--device", "cuda", "-o", "cuda-out")
    left = (w.work / "cuda-out").exists()
    verdict(
        "8b",
        "--device cuda refusal leaves OUT behind",
        left,
        cuda.code == 2 and not left,
        cuda,
        tail(cuda.err, 1),
        f"cuda-out exists afterwards: {left}",
    )
    w.cli("annotate", "imgs", "-t", "OD", "-m", "tiny-model", "-o", "v8")
    viz = w.cli("viz", "v8/od.json", "--images", "empty", "-o", "viz8")
    verdict(
        "8c",
        "a wrong viz --images folder",
        len(viz.lines()) > 1,
        len(viz.lines()) == 1,
        viz,
        f"{len(viz.lines())} stderr lines",
        tail(viz.err, 2),
    )
    cut = w.cli("annotate", "bad", "-t", "OD", "-m", "tiny-model", "-o", "b8")
    error = next((line for line in cut.lines() if "cut.jpg" in line), "")
    classes = re.search(r"\b[A-Z]\w*(Error|Exception)\b", error) is not None
    verdict("8d", "Python class names in messages", classes, bool(error) and not classes, cut, error)
    one = w.cli("annotate", "imgs/street.jpg", "-t", "OD", "-m", "tiny-model", "-o", "one")
    export = w.cli("export", "one/od.json", "--to", "labelstudio", "-o", "ls8")
    plural = "1 images" in one.err or "1 files" in export.out
    verdict(
        "8e",
        "'1 images', 'Wrote 1 files'",
        plural,
        not plural and "1 image" in one.err,
        one,
        tail(one.err, 1),
        export,
        tail(export.out, 1),
    )
    capton = w.cli("annotate", "imgs", "-t", "CAPTON", "-m", "tiny-model", "-o", "c8")
    verdict(
        "8f",
        "-t CAPTON",
        "did you mean" not in capton.err.lower(),
        "did you mean CAPTION" in capton.err,
        capton,
        tail(capton.err, 1),
    )
    usage = w.cli("annotate", "imgs", "-t", "OD", "--batch-size", "x")
    verdict(
        "8g",
        "usage errors in one line",
        len(usage.lines()) > 1,
        len(usage.lines()) == 1 and capton.lines() and len(capton.lines()) == 1,
        usage,
        f"{len(usage.lines())} stderr lines:",
        usage.err.strip(),
    )


ITEMS = {
    "1": item_1,
    "2": item_2,
    "3": item_3,
    "4": item_4,
    "5": item_5,
    "6": item_6,
    "7": item_7,
    "8": item_8,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", type=Path, help="a florence-cli checkout (its CLI runs from there)")
    parser.add_argument("--python", default=sys.executable, help="an interpreter with its dependencies")
    parser.add_argument("--work", type=Path, help="the scratch folder (emptied; default: a temporary one)")
    parser.add_argument("--items", default=",".join(ITEMS), help="which items, e.g. 1,5")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="first-hour-"))
    walk = Walk(args.checkout, args.python, work)
    head = subprocess.run(
        ["git", "-C", str(args.checkout), "log", "-1", "--format=%h %s"], capture_output=True, text=True
    )
    print(f"checkout {args.checkout} at {head.stdout.strip()[:70]}; scratch {work}")
    start = time.monotonic()
    walk.set_up()
    print(
        f"set up in {time.monotonic() - start:.1f} s (tiny models, imgs/, other/, many/ of {MANY}, shards/)"
    )
    for number in args.items.split(","):
        ITEMS[number](walk)
    print(f"done in {time.monotonic() - start:.0f} s")


if __name__ == "__main__":
    main()
