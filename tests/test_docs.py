"""The documentation against the code: every training command in README.md and docs/*.md parses (accelerate's
launch parser takes the launcher flags, the script's own parse_args the script's), so no documented flag goes
stale; every row of docs/bad_inputs.md names tests that exist and quotes messages the code prints.
(examples/slurm/*.sbatch is checked by test_multinode.py.)"""

import ast
import glob
import importlib
import importlib.util
import inspect
import os
import re
import shlex
from functools import lru_cache

import pytest

from scaling_helpers import script_parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
SCRIPT = re.compile(r"(?:^|/)(train_tfd_\w+)\.py$")
RUNNERS = {"accelerate", "python", "python3", "srun"}  # a command whose program is one of these runs a script

# ----------------------------------------------------------------------------------------------
# Every documented training command parses.
# ----------------------------------------------------------------------------------------------

# What the commands hold in place of a value: accelerate's integer flags need an integer.
PLACEHOLDER_VALUES = {"R": "0"}
# Flags whose file must exist when parse_args runs (the others are looked for later, by main).
PATH_FLAGS = ("--prompts_file", "--fid_reference_stats")
# Packages a documented command may need installed (README: `pip install bitsandbytes` for --use_8bit_adam).
OPTIONAL_PACKAGES = ("bitsandbytes", "wandb", "comet_ml", "mlflow")


def bash_lines(path):
    """(line number, command) of every ```bash block of a markdown file, continuation lines joined."""
    lines = open(path, encoding="utf-8").read().split("\n")
    out, in_bash, start, pending = [], False, 0, ""
    for number, line in enumerate(lines, 1):
        if line.startswith("```"):
            in_bash = not in_bash and line.strip() == "```bash"
            continue
        if not in_bash:
            continue
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((start, pending + line))
        pending = ""
    return out


def training_commands():
    """(doc:line, launcher flags or None, script name, script flags) of every command that runs a training
    script: `accelerate launch [flags] train_tfd_X.py ...`, `python train_tfd_X.py ...`, `srun ... accelerate
    launch ...`; environment assignments before the program are skipped."""
    found = []
    for path in DOCS:
        for number, line in bash_lines(path):
            tokens = shlex.split(line, comments=True)
            while tokens and re.match(r"^\w+=", tokens[0]):
                tokens.pop(0)
            scripts = [i for i, t in enumerate(tokens) if SCRIPT.search(t)]
            if not tokens or not scripts or os.path.basename(tokens[0]) not in RUNNERS:
                continue
            i = scripts[0]
            before = tokens[:i]
            programs = [k for k, t in enumerate(before) if os.path.basename(t) in ("accelerate", "python", "python3")]
            assert programs, f"{path}:{number}: no accelerate or python before the script: {line}"
            k = programs[-1]
            launcher = before[k + 2:] if os.path.basename(before[k]) == "accelerate" else None
            if launcher is not None:
                assert before[k + 1] == "launch", f"{path}:{number}: {line}"
            where = f"{os.path.relpath(path, ROOT)}:{number}"
            found.append((where, launcher, tokens[i], tokens[i + 1:]))
    return found


COMMANDS = training_commands()


def minimal_flags(name, argv):
    """The required flags a command elides with `...` (a teacher, a data or prompt source)."""
    given = set(argv)
    extra = []
    if not given & {"--pretrained_model_name_or_path", "--pretrained_teacher_model"}:
        extra += ["--pretrained_model_name_or_path", "teacher"]
    if name == "train_tfd_imagenet64" and not given & {"--dataset_name", "--train_data_dir"}:
        extra += ["--dataset_name", "data"]
    if name != "train_tfd_imagenet64" and not given & {"--dataset_name", "--prompts_file"}:
        extra += ["--prompts_file", "prompts.txt"]
    return extra


def test_the_readme_holds_a_complete_training_command_of_every_script():
    """The README's commands run as written: none leaves flags out with `...` (the docs may)."""
    readme = [c for c in COMMANDS if c[0].startswith("README.md:")]
    assert {SCRIPT.search(script).group(1) for _, _, script, _ in readme} == {
        "train_tfd_sdxl", "train_tfd_sd3", "train_tfd_imagenet64"}
    assert [where for where, _, _, argv in readme if "..." in argv] == []


@pytest.mark.parametrize("where, launcher, script, argv", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_every_documented_training_command_parses(where, launcher, script, argv, tmp_path, monkeypatch):
    """The launcher flags with accelerate's own parser; the script's flags with the script's parse_args, in a
    folder holding the files parse_args looks for; `...` stands for the flags a command leaves out."""
    from accelerate.commands.launch import launch_command_parser

    name = SCRIPT.search(script).group(1)
    assert os.path.isfile(os.path.join(ROOT, script)), f"{where}: {script} is not in the repository"
    argv = [PLACEHOLDER_VALUES.get(a, a) for a in argv]
    documented = set(argv)
    if "..." in argv:
        argv = minimal_flags(name, argv) + [a for a in argv if a != "..."]
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    if launcher is not None:
        try:
            launch = launch_command_parser().parse_args([PLACEHOLDER_VALUES.get(a, a) for a in launcher] + [script])
        except SystemExit as e:
            pytest.fail(f"{where}: accelerate launch {' '.join(launcher)}\nexits with status {e.code} (see stderr)")
        if launch.config_file:
            assert os.path.isfile(os.path.join(ROOT, launch.config_file)), f"{where}: no {launch.config_file}"
        if launch.mixed_precision:  # what accelerate launch passes on to the script
            monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launch.mixed_precision)
    path, number = where.rsplit(":", 1)
    before = "\n".join(open(os.path.join(ROOT, path), encoding="utf-8").read().split("\n")[:int(number) - 1])
    for flag in PATH_FLAGS:
        if flag in argv:
            i = argv.index(flag) + 1
            assert flag not in documented or os.path.basename(argv[i]) in before, (
                f"{where}: {flag} {argv[i]}: the document does not say where this file comes from before the command")
            if os.path.isabs(argv[i]):
                argv[i] = str(tmp_path / os.path.basename(argv[i]))
            os.makedirs(os.path.dirname(os.path.abspath(argv[i])), exist_ok=True)
            with open(argv[i], "w") as f:
                f.write("a photo of a cat\n")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda package, *a: object() if package in OPTIONAL_PACKAGES else find_spec(package, *a))
    try:
        importlib.import_module(name).parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"{where}: {script} {' '.join(argv)}\nexits with status {e.code} (see the captured stderr)")
    except Exception as e:
        pytest.fail(f"{where}: {script} {' '.join(argv)}\n{type(e).__name__}: {e}")


# ----------------------------------------------------------------------------------------------
# docs/bad_inputs.md: each row names tests that exist and quotes messages the code prints.
# ----------------------------------------------------------------------------------------------

BAD_INPUTS = os.path.join(ROOT, "docs", "bad_inputs.md")
# The placeholders bad_inputs.md uses for what differs from run to run (its introduction lists them).
PLACEHOLDERS = ("ORG/NAME", "PATH", "OUT", "DATA", "CACHE", "KEY", "NAME", "REASON", "CWD", "N", "...")
FLAGS_SECTION = "## Flags"  # its rows' inputs are command lines, run through parse_args
PROJECT_SOURCES = [os.path.join(ROOT, f) for f in ("tfd_utils.py", "tfd_training.py", "tfd_text2image.py",
                                                   "tfd_fid.py", "train_tfd_sdxl.py", "train_tfd_sd3.py",
                                                   "train_tfd_imagenet64.py")]
# Messages a library prints, which the table quotes (datasets' empty folder, PIL's decoding errors).
LIBRARY_MODULES = ("datasets.data_files", "PIL.Image", "PIL.ImageFile")
EXCEPTION = re.compile(r"^[A-Z]\w*(Error|Exception): ")
HOLE = object()
WILD = object()


def split_cells(row):
    """A markdown table row's cells; pipes inside code spans or escaped (\\|) do not split."""
    cells, cell, ticks, i = [], "", 0, 0
    row = row.strip()[1:-1]
    while i < len(row):
        if row[i] == "`":
            n = len(row[i:]) - len(row[i:].lstrip("`"))
            ticks = 0 if ticks == n else ticks or n
            cell, i = cell + "`" * n, i + n
            continue
        if row[i] == "\\" and row[i + 1:i + 2] == "|":
            cell, i = cell + "|", i + 2
            continue
        if row[i] == "|" and not ticks:
            cells.append(cell.strip())
            cell = ""
        else:
            cell += row[i]
        i += 1
    return cells + [cell.strip()]


def code_spans(text):
    return [m.group(2).strip() for m in re.finditer(r"(`+)(.+?)\1", text)]


def table_rows():
    """(line number, section, input, what happens, tests) of every row of every table in bad_inputs.md; the
    section is the last `## ` heading above it."""
    rows, section = [], None
    for number, line in enumerate(open(BAD_INPUTS, encoding="utf-8").read().split("\n"), 1):
        if line.startswith("## "):
            section = line.strip()
        if not line.startswith("|") or re.match(r"^\|[-| ]+\|$", line) or line.startswith("| input |"):
            continue
        cells = split_cells(line)
        assert len(cells) == 3, f"bad_inputs.md:{number}: {len(cells)} cells: {line}"
        rows.append((number, section, *cells))
    return rows


ROWS = table_rows()


def messages(happens):
    """The quoted messages of a row: the code spans of its middle cell that hold a space."""
    return [span for span in code_spans(happens) if " " in span]


def named_tests(cell):
    """`file.py::function` and `file.py` entries of a row's test cell."""
    return re.findall(r"(test_\w+\.py)(?:::(test_\w+))?", cell)


@pytest.mark.parametrize("number, section, given, happens, tests", ROWS, ids=[f"line{r[0]}" for r in ROWS])
def test_every_bad_input_row_names_tests_that_exist(number, section, given, happens, tests):
    names = named_tests(tests)
    assert names, f"bad_inputs.md:{number}: no test named ({tests!r})"
    for file, function in names:
        path = os.path.join(ROOT, "tests", file)
        assert os.path.isfile(path), f"bad_inputs.md:{number}: tests/{file} does not exist"
        if function:
            assert re.search(rf"^def {function}\(", open(path).read(), re.M), \
                f"bad_inputs.md:{number}: tests/{file} has no {function}"


def placeholder_pattern():
    """The placeholders as a regex: whole words, `...` with the space before it."""
    return "|".join(r"\s?\.\.\." if p == "..." else rf"\b{re.escape(p)}\b" for p in PLACEHOLDERS)


def as_regex(message):
    """A quoted message as a regex over what the code printed: placeholders match anything."""
    parts = re.split(f"({placeholder_pattern()})", message)
    return "".join(".*?" if k % 2 else re.escape(part) for k, part in enumerate(parts))


SCRIPTS = {"ImageNet-64": "train_tfd_imagenet64", "SDXL": "train_tfd_sdxl", "SD3": "train_tfd_sd3"}


def flag_inputs(given):
    """(script, argv) of each code span of a Flags row's input cell that starts with `--`; the script is the
    one named just before the span (ImageNet-64, SDXL, SD3), else the first whose parser has its flags."""
    inputs = []
    for m in re.finditer(r"(`+)(--.+?)\1", given):
        named = [(given.rfind(k, 0, m.start()), v) for k, v in SCRIPTS.items() if k in given[:m.start()]]
        inputs.append((max(named)[1] if named else None, shlex.split(m.group(2))))
    return inputs


def printed(name, argv, tmp_path, capsys, caplog):
    """What parse_args(base flags + argv) prints: the exception as Python shows it, stderr, log records."""
    import logging

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\n")
    base = ["--pretrained_model_name_or_path", "teacher"] + (
        ["--dataset_name", "data"] if name == "train_tfd_imagenet64" else ["--prompts_file", str(prompts)])
    text = ""
    with caplog.at_level(logging.WARNING):
        try:
            importlib.import_module(name).parse_args(base + argv)
        except SystemExit:
            pass
        except Exception as e:
            text = f"{type(e).__name__}: {e}\n"
    return text + capsys.readouterr().err + "\n".join(r.getMessage() for r in caplog.records)


FLAG_ROWS = [r for r in ROWS if r[1] == FLAGS_SECTION and flag_inputs(r[2])]


@pytest.mark.parametrize("number, section, given, happens, tests", FLAG_ROWS, ids=[f"line{r[0]}" for r in FLAG_ROWS])
def test_every_flag_row_prints_its_messages(number, section, given, happens, tests, tmp_path, capsys, caplog,
                                            monkeypatch):
    """A Flags row's inputs run through the script's parse_args (optional packages absent, as the rows say);
    every message the row quotes is what one of them prints."""
    inputs, quoted = flag_inputs(given), messages(happens)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda package, *a: None if package in OPTIONAL_PACKAGES else find_spec(package, *a))
    outputs = []
    for name, argv in inputs:
        names = [name] if name else [n for n in SCRIPTS.values()
                                     if all(f.split("=")[0] in option_strings(n) for f in argv if f.startswith("--"))]
        outputs.append(printed((names or ["train_tfd_imagenet64"])[0], argv, tmp_path, capsys, caplog))
        caplog.clear()
    assert quoted, f"bad_inputs.md:{number}: no message quoted"
    for message in quoted:
        assert any(re.search(as_regex(message), out) for out in outputs), (
            f"bad_inputs.md:{number}: {message!r} is not what the inputs print:\n" + "\n---\n".join(outputs))


@lru_cache(maxsize=None)
def option_strings(name):
    return {o for a in script_parser(importlib.import_module(name))._actions for o in a.option_strings}


# The other rows need models, data or runs: each quoted message must be an instance of a string the code
# builds (an f-string, a concatenation, a constant), its values where the code fills them in.


def template(node):
    """A string expression as a list of literal characters and HOLEs (the values an f-string or a
    concatenation fills in), or None when it is not a string."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return list(node.value)
    if isinstance(node, ast.JoinedStr):
        out = []
        for part in node.values:
            out += list(part.value) if isinstance(part, ast.Constant) else [HOLE]
        return out
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = template(node.left), template(node.right)
        if left is None and right is None:
            return None
        return (left or [HOLE]) + (right or [HOLE])
    return None


def string_parts(node):
    """The nodes a string template is made of (an f-string's literal parts, a concatenation's operands)."""
    if isinstance(node, ast.JoinedStr):
        return [v for v in node.values if isinstance(v, ast.Constant)]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add) and template(node) is not None:
        operands = [node.left, node.right]
        return operands + [p for o in operands if isinstance(o, (ast.BinOp, ast.JoinedStr)) for p in string_parts(o)]
    return []


def percent_holes(chars):
    """A library's %-format string ('cannot identify image file %r'): its conversions are HOLEs."""
    text = "".join(c if c is not HOLE else "\0" for c in chars)
    parts = re.split(r"%(?:\([^)]*\))?[-#0 +]*\d*(?:\.\d+)?[sdrif]", text)
    out = []
    for k, part in enumerate(parts):
        out += [HOLE if c == "\0" else c for c in part] + ([HOLE] if k < len(parts) - 1 else [])
    return out


def literal_runs(items, marker):
    runs, run = [], ""
    for c in items + [marker]:
        if c is marker:
            runs.append(run)
            run = ""
        else:
            run += c
    return runs


@lru_cache(maxsize=None)
def source_templates():
    """Every string template of the project's scripts and modules and of the library modules whose messages
    the table quotes: [(template, its text with holes as NUL, its longest literal run)], and the set of plain
    string constants."""
    files = [(p, False) for p in PROJECT_SOURCES]
    files += [(inspect.getsourcefile(importlib.import_module(m)), True) for m in LIBRARY_MODULES]
    templates, constants, seen = [], set(), set()
    for path, library in files:
        tree = ast.parse(open(path, encoding="utf-8").read())
        inner = {id(part) for node in ast.walk(tree) for part in string_parts(node)}  # parts are no string alone
        for node in ast.walk(tree):
            t = template(node) if id(node) not in inner else None
            if not t:
                continue
            t = percent_holes(t) if library else t
            text = "".join(c if c is not HOLE else "\0" for c in t)
            if HOLE not in t:
                constants.add(text)
            if text not in seen:
                seen.add(text)
                templates.append((t, text, [r for r in literal_runs(t, HOLE) if r]))
    return templates, frozenset(constants)


@lru_cache(maxsize=None)
def _candidates(doc_runs, short=False):
    templates, _ = source_templates()
    text = "\0".join(doc_runs)
    if short:
        return [t for t, whole, runs in templates
                if len(whole) <= 120 and any(len(r.strip()) >= 5 and r.strip() in text for r in runs)]
    long_runs = [r for r in doc_runs if len(r) >= 10]
    found = [t for t, whole, runs in templates if any(len(r.strip()) >= 10 and r.strip() in text for r in runs)
             or any(r in whole for r in long_runs)]
    return found or [t for t, _, runs in templates
                     if runs and sum(map(len, runs)) >= 4 and all(r in text for r in runs)]


def candidates(doc, short=False):
    """The templates a quoted message (characters and WILDs) may be an instance of: one of the template's
    literal stretches of 10 characters or more is in it, or one of its own is in the template; failing that,
    every stretch of the template is in it.
    short: the templates of up to 120 characters with a stretch of 5 or more in it (what a hole may hold)."""
    return _candidates(tuple(literal_runs(list(doc), WILD)), short)


def doc_items(message):
    """A quoted message as literal characters and WILDs (its placeholders; `...` with the space before it)."""
    items = []
    for k, part in enumerate(re.split(f"({placeholder_pattern()})", message)):
        items += [WILD] if k % 2 else list(part)
    return items


def value_like(text):
    """What an f-string hole may stand for in a quoted message: a value, not wording: at most one word of
    three or more letters (a number, a name, a path, a flag and its value, a quoted or bracketed value)."""
    return len(re.findall(r"(?<![\w/.-])[A-Za-z]{3,}(?![\w/.-])", text)) <= 1


@lru_cache(maxsize=None)
def absorbable(items, depth):
    """Whether a HOLE of a template at `depth` may stand for these message items: a value (value_like), a string
    constant of the code, or (at depth 0) an instance of a short template."""
    _, constants = source_templates()
    text = "".join(d for d in items if d is not WILD)
    return value_like(text) or text in constants or (
        depth == 0 and len(text) >= 8 and any(matches(items, t, 1) for t in candidates(items, short=True)))


def matches(doc, tmpl, depth=0):
    """Whether the quoted message (characters and WILDs) is an instance of the template (characters and HOLEs):
    literal characters equal; a WILD stands for any stretch of the template; a HOLE for a value, a string
    constant of the code or an instance of a short template (absorbable); the message may end before the
    template's last holes and the spaces next to them."""
    doc = tuple(doc)
    n, m = len(doc), len(tmpl)

    def fits(k, j):  # doc position k may follow template position j - 1
        return k == n or doc[k] is WILD or j == m or tmpl[j] is HOLE or doc[k] == tmpl[j]

    seen, stack = set(), [(0, 0)]
    while stack:
        i, j = stack.pop()
        if (i, j) in seen:
            continue
        seen.add((i, j))
        if i == n:
            if all(t is HOLE or t == " " for t in tmpl[j:]):
                return True
            continue
        if doc[i] is WILD:
            stack += [(i + 1, jj) for jj in range(j, m + 1) if fits(i + 1, jj)]
        elif j < m and tmpl[j] is HOLE:
            stack += [(k, j + 1) for k in range(i, n + 1)
                      if fits(k, j + 1) and (k == i or absorbable(doc[i:k], depth))]
        elif j < m and doc[i] == tmpl[j]:
            stack.append((i + 1, j + 1))
    return False


OTHER_MESSAGES = [(r[0], m) for r in ROWS if r[1] != FLAGS_SECTION or not flag_inputs(r[2]) for m in messages(r[3])]


@pytest.mark.parametrize("number, message", OTHER_MESSAGES,
                         ids=[f"line{n}-{k}" for k, (n, _) in enumerate(OTHER_MESSAGES)])
def test_every_other_quoted_message_is_one_the_code_prints(number, message):
    doc = doc_items(EXCEPTION.sub("", message))
    literal = "".join(d for d in doc if d is not WILD).strip()
    assert len(literal) >= 5, f"bad_inputs.md:{number}: too little text to check: {message!r}"
    assert any(matches(doc, t) for t in candidates(doc)), (
        f"bad_inputs.md:{number}: no message of the code reads {message!r}")


# ----------------------------------------------------------------------------------------------
# docs/method.md follows tfd_utils.py: its numbered sections, the functions its map names.
# ----------------------------------------------------------------------------------------------


def first_word(title):
    return re.sub(r"^the\s+", "", title.strip().lower()).split()[0].strip(":,.")


def test_method_md_has_the_sections_of_tfd_utils_and_names_its_functions():
    import tfd_utils

    code = re.findall(r"^# (\d)\. (.+)$", open(os.path.join(ROOT, "tfd_utils.py"), encoding="utf-8").read(), re.M)
    method = open(os.path.join(ROOT, "docs", "method.md"), encoding="utf-8").read()
    doc = re.findall(r"^## (\d)\. (.+)$", method, re.M)
    assert [n for n, _ in code] == [n for n, _ in doc] == list("1234567")
    assert [first_word(t) for _, t in code] == [first_word(t) for _, t in doc]
    table = method.split("\n## Function map\n")[1].split("\n## ")[0]
    rows = [split_cells(line) for line in table.split("\n") if line.startswith("| ") and "---" not in line][1:]
    names = {name for _, functions in rows for name in re.findall(r"`(\w+)`", functions)}
    missing = {n for n in names if not hasattr(tfd_utils, n) and not hasattr(tfd_utils.TFDLoss, n)}
    assert len(names) > 30 and not missing, missing


def test_testing_md_lists_every_test_file():
    text = open(os.path.join(ROOT, "docs", "testing.md"), encoding="utf-8").read()
    table = text.split("\n## What the suite covers\n")[1].split("\n## ")[0]
    listed = {name for line in table.split("\n") if line.startswith("| `")
              for name in re.findall(r"`(test_\w+\.py)`", split_cells(line)[0])}
    files = {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "tests", "test_*.py"))}
    assert listed == files, (files - listed, listed - files)
