"""Malformed input into every reader, never a crash: image bytes into the decoder; manifest.json
into the bundle loader, `setok run` and `setok export-triton`; engines.json into its reader and the
Triton repository writer.

The manifest and engines.json fuzz is structure-aware: it starts from real documents (the tiny
bundle's, and an engines.json written for it) and mutates them along their schema: every field
replaced by a value of every JSON type it must not hold, keys dropped, lists emptied, nesting
changed (wrapped in a list or an object, or unwrapped), list items dropped or duplicated. A wrong
type must be refused with one line naming the field's path; nothing may ever reach a traceback.
"""

from __future__ import annotations

import copy
import io
import json
import re
import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from setok import manifest as M
from setok.backends.trt import engines as E
from setok.errors import InputError, SetokError
from setok.runtime.preprocess import load_image


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


PNG = _png()


# Shared by the mutation fuzzers below: reproducible (derandomized, no example database), and the
# fixtures / large documents they use are expected.
MUTATION_SETTINGS = {"deadline": None, "derandomize": True, "database": None,
                     "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                               HealthCheck.data_too_large]}

@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(st.binary(max_size=512),
                      st.builds(lambda cut, flip: bytes(b ^ (0xFF if i == flip else 0) for i, b in enumerate(PNG[:cut])),
                                st.integers(0, len(PNG)), st.integers(0, len(PNG)))))
def test_image_decoder_fuzz(tmp_path, data):
    path = tmp_path / "x.png"
    path.write_bytes(data)
    try:
        out = load_image(path, 16)
    except InputError as e:
        assert str(path) in str(e)
    else:
        assert out.shape == (16, 16, 3) and out.dtype == np.uint8


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    # A valid PNG header claiming 10000 x 10000 pixels; the pixel data would be 300 MB.
    Image.new("L", (10000, 10000)).save(tmp_path / "bomb.png", optimize=True)
    try:
        load_image(tmp_path / "bomb.png", 16)
    except InputError as e:
        assert "pixels" in str(e)
    else:
        raise AssertionError("a 100-megapixel image was decoded")


# ---- walking and mutating JSON documents --------------------------------------------------------
Path_ = tuple  # keys and indices from the document's root
KINDS = {"null": None, "boolean": True, "integer": 7, "number": 0.5, "string": "x", "list": [1], "object": {"k": 1}}


def kind(v) -> str:
    for name, t in (("boolean", bool), ("integer", int), ("number", float), ("string", str), ("list", list),
                    ("object", dict)):
        if isinstance(v, t):
            return name
    return "null"


def nodes(doc, path: Path_ = ()) -> Iterator[tuple[Path_, object]]:
    """Every node below the root, parents before children."""
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for k, v in items:
        yield (*path, k), v
        yield from nodes(v, (*path, k))


def get(doc, path: Path_):
    for k in path:
        doc = doc[k]
    return doc


def dotted(doc, path: Path_, named: dict[str, str]) -> str:
    """The path as the readers print it: `stages.llm.inputs[0].shape`; a record of a list in `named`
    (list path -> key) is called by that key while it is a plain name (`stages[3]` otherwise)."""
    out, node = "", doc
    for k in path:
        if isinstance(k, int):
            item = node[k]
            name = item.get(named[out]) if out in named and isinstance(item, dict) else None
            unique = isinstance(name, str) and [isinstance(x, dict) and x.get(named[out]) for x in node].count(name) == 1
            out = f"{out}.{name}" if unique and re.fullmatch(r"[A-Za-z0-9_\-<>]+", name) else f"{out}[{k}]"
        else:
            out = f"{out}.{k}" if re.fullmatch(r"[A-Za-z0-9_\-<>]+", k) else f"{out}[{json.dumps(k)}]"
            out = out.lstrip(".")
        node = node[k]
    return out


def accepted_kinds(where: str, value, unions: list[tuple[str, set[str]]]) -> set[str]:
    """The JSON kinds a field may hold: its own, the alternatives its schema allows."""
    ok = {kind(value)} | ({"integer"} if kind(value) == "number" else set())
    for pattern, kinds in unions:
        if re.search(pattern, where):
            ok |= kinds
    return ok


def retype_cases(doc, named, unions, skip=()) -> Iterator[tuple[Path_, str, object]]:
    """(path, expected printed path, document) for every node and every JSON kind it must not hold."""
    for path, value in list(nodes(doc)):
        if path[0] in skip:
            continue
        where = dotted(doc, path, named)
        for k in sorted(set(KINDS) - accepted_kinds(where, value, unions)):
            d = copy.deepcopy(doc)
            get(d, path[:-1])[path[-1]] = copy.deepcopy(KINDS[k])
            # A record renamed to a non-name is called by its index from then on.
            yield path, dotted(d, path, named), d


def mutate(doc, path: Path_, how: str):
    """One structural mutation at `path` (a copy); None when it does not apply there."""
    d = copy.deepcopy(doc)
    parent, key = get(d, path[:-1]), path[-1]
    value = parent[key]
    if how == "drop":
        del parent[key]
    elif how == "empty" and isinstance(value, (list, dict)) and value:
        parent[key] = type(value)()
    elif how == "wrap_list":
        parent[key] = [value]
    elif how == "wrap_object":
        parent[key] = {"value": value}
    elif how == "unwrap" and isinstance(value, (list, dict)) and value:
        parent[key] = next(iter(value.values())) if isinstance(value, dict) else value[0]
    elif how == "duplicate" and isinstance(parent, list):
        parent.insert(key, copy.deepcopy(value))
    elif how.startswith("retype:"):
        parent[key] = copy.deepcopy(KINDS[how[7:]])
    else:
        return None
    return d


HOWS = ["drop", "empty", "wrap_list", "wrap_object", "unwrap", "duplicate", *(f"retype:{k}" for k in KINDS)]


@st.composite
def mutations(draw, doc, paths: list[Path_], stage_paths: list[Path_]):
    """1-3 structural mutations; half of the paths are drawn inside stage records."""
    d, applied = doc, []
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(stage_paths) | st.sampled_from(paths))
        how = draw(st.sampled_from(HOWS))
        try:
            get(d, path)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed or reshaped it
        new = mutate(d, path, how)
        if new is not None:
            d, applied = new, [*applied, (path, how)]
    return d, applied


def one_line_error(result) -> str:
    """The CLI's refusal: exit 2, nothing but `error: ...` on one line, no exception but the exit."""
    err = result.stderr.strip()
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), (result.exit_code, result.output,
                                                                               result.exc_info)
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in result.output, err
    return err


def run_cli(*args: str):
    from setok.cli.main import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)


# ---- manifest.json ------------------------------------------------------------------------------
MANIFEST_NAMED = {"stages": "name"}
MANIFEST_UNIONS = [(r"\.shape\[\d+\]$", {"integer", "string"}), (r"\.hf_path$", {"string", "null"}),
                   (r"\.hf_config$", {"object", "null"})]
# Keys a manifest may lack: legacy bundles, fields only some bundles carry, the model config (the
# runtime reads two keys of it).
OPTIONAL = re.compile(r"^(config\.(?!encoder$|encoder\.image_size$|encoder\.patch_size$).+"
                      r"|preprocessing\.(layout|channels|resize|mode)|text\.(num_layers|chat_template)"
                      r"|text\.special_ids\.<(pad|unk)>"
                      r"|stages\.\w+\.(extra(\.(kv_cache|op|plugin_namespace|op_version))?|form_of|data))$")
MAY_BE_EMPTY = re.compile(r"(\.shape|\.data|^config\..+)$")


@pytest.fixture(scope="module")
def doc(tiny_bundle):
    return json.loads((tiny_bundle / M.MANIFEST).read_text())


@pytest.fixture(scope="module")
def scratch(tiny_bundle, tmp_path_factory):
    """A copy of the tiny bundle whose manifest.json each case rewrites, and a frame to run on."""
    import shutil

    root = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(tiny_bundle, root / "b")
    (root / "frame.png").write_bytes(PNG)
    return root


def test_every_manifest_field_refuses_every_wrong_json_type(doc):
    """Exhaustive: each node of the tiny manifest, each JSON kind it must not hold -> one error naming it."""
    n = in_stages = 0
    for path, where, d in retype_cases(doc, MANIFEST_NAMED, MANIFEST_UNIONS, skip=("schema_version",)):
        with pytest.raises(M.FieldError) as e:
            M.check_manifest(d)
        assert str(e.value).startswith(f"{where}: got "), (path, str(e.value))
        n, in_stages = n + 1, in_stages + (path[0] == "stages")
    assert n > 1500 and in_stages > 0.5 * n, (n, in_stages)


def test_dropped_keys_and_emptied_lists_are_refused_by_name_unless_optional(doc):
    """Exhaustive: each key dropped, each list emptied -> refused naming it, unless the schema allows it."""
    refused = accepted = 0
    for path, value in list(nodes(doc)):
        hows = (["drop"] if isinstance(path[-1], str) else []) + (["empty"] if isinstance(value, list) else [])
        for how in hows:
            d = mutate(doc, path, how)
            if d is None or path == ("schema_version",):
                continue
            parent = dotted(d, path[:-1], MANIFEST_NAMED)  # a stage that lost its name is called by its index
            where = dotted(doc, path, MANIFEST_NAMED) if how == "empty" else f"{parent}.{path[-1]}".lstrip(".")
            try:
                M.check_manifest(d)
            except M.FieldError as e:
                refused += 1
                assert how == "empty" or not OPTIONAL.match(where), f"{where} is optional, yet: {e}"
                assert str(e).startswith(where if how == "empty" else f"{where} is missing"), (where, how, str(e))
            else:
                accepted += 1
                assert OPTIONAL.match(where) if how == "drop" else MAY_BE_EMPTY.search(where), (where, how)
    assert refused > 200 and accepted > 20, (refused, accepted)


def test_a_wrong_schema_version_type_is_refused(scratch, doc):
    for bad in (True, 1.0, "1", None, [1]):
        (scratch / "b" / M.MANIFEST).write_text(json.dumps({**doc, "schema_version": bad}))
        with pytest.raises(M.BundleError, match="schema_version"):
            M.load_manifest(scratch / "b", verify=False)


@settings(max_examples=400, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(doc=st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                        lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
                        max_leaves=20),
       raw=st.binary(max_size=64))
def test_manifest_loader_takes_any_bytes(tmp_path, doc, raw):
    """Unstructured noise: not JSON, JSON of any shape, a schema 1 document with anything as stages."""
    for content in (json.dumps(doc).encode(), raw, json.dumps({"schema_version": 1, "stages": doc}).encode(),
                    b"[" * 100_000):
        (tmp_path / "manifest.json").write_bytes(content)
        with pytest.raises(M.BundleError) as e:
            M.load_manifest(tmp_path)
        assert len(str(e.value).splitlines()) == 1


def test_structured_manifest_fuzz_through_setok_run(doc, scratch):
    """`setok run` in-process on structurally mutated manifests: exit 0, or exit 2 with one line.
    Most cases are refused, and most refusals are inside stage records (the mutations get there)."""
    paths = [p for p, _ in nodes(doc) if p != ("schema_version",)]
    stage_paths = [p for p in paths if p[0] == "stages"]
    outcomes: list[tuple[str, str]] = []

    @settings(max_examples=80, **MUTATION_SETTINGS)
    @given(case=mutations(doc, paths, stage_paths))
    def one(case):
        d, _ = case  # (document, the mutations applied: hypothesis prints them on a failure)
        (scratch / "b" / M.MANIFEST).write_text(json.dumps(d))
        result = run_cli("run", scratch / "b", "--image", scratch / "frame.png")
        if result.exit_code == 0:
            assert result.exception is None and "caption:" in result.output
            outcomes.append(("ran", ""))
        else:
            outcomes.append(("refused", one_line_error(result)))

    one()
    refused = [m for k, m in outcomes if k == "refused"]
    in_stages = [m for m in refused if "manifest.json: stages." in m or "manifest.json: stages[" in m]
    assert len(refused) >= 0.6 * len(outcomes), outcomes
    assert len(in_stages) >= 0.4 * len(refused), refused  # stage-entry validation, not just the top level
    assert all("manifest.json: " in m for m in in_stages)


@pytest.mark.parametrize("case", ["retype", "drop_text", "not_json"])
def test_setok_run_subprocess_refuses_a_malformed_manifest_in_one_line(doc, scratch, tmp_path, case):
    import shutil

    b = tmp_path / "b"
    shutil.copytree(scratch / "b", b)
    d = copy.deepcopy(doc)
    llm = next(s for s in d["stages"] if s["name"] == "llm")
    want = {"retype": "stages.llm.inputs[0].shape: got a string", "drop_text": "text is missing",
            "not_json": "is not valid JSON"}[case]
    if case == "retype":
        llm["inputs"][0]["shape"] = "batch"
    elif case == "drop_text":
        del d["text"]
    (b / M.MANIFEST).write_text("{\"schema_version\": 1, " if case == "not_json" else json.dumps(d))
    out = subprocess.run([sys.executable, "-m", "setok.cli", "run", str(b), "--image", str(scratch / "frame.png")],
                         capture_output=True, text=True, timeout=120, check=False)
    err = out.stderr.strip()
    assert out.returncode == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and want in err, err


def test_structured_manifest_fuzz_through_export_triton(doc, scratch):
    """The Triton repository writer reads the same manifest: exit 0 or one line, never a traceback."""
    paths = [p for p, _ in nodes(doc) if p != ("schema_version",)]
    stage_paths = [p for p in paths if p[0] == "stages"]
    outcomes = []

    @settings(max_examples=30, **MUTATION_SETTINGS)
    @given(case=mutations(doc, paths, stage_paths))
    def one(case):
        (scratch / "b" / M.MANIFEST).write_text(json.dumps(case[0]))
        result = run_cli("export-triton", scratch / "b", "--out", scratch / "repo")
        outcomes.append(result.exit_code)
        if result.exit_code != 0:
            one_line_error(result)

    one()
    assert outcomes.count(2) >= 0.6 * len(outcomes), outcomes


# ---- engines.json -------------------------------------------------------------------------------
ENGINES_NAMED = {"engines": "stage"}
ENGINES_UNIONS = [(r"\.shape\[\d+\]$", {"integer", "string"}), (r"^timing_cache$", {"string", "null"}),
                  (r"\.plugin$", {"object", "null"})]


@pytest.fixture(scope="module")
def engines_dir(tiny_bundle, tmp_path_factory):
    """An engines directory as `setok build` writes it for the tiny bundle (every stage, both llm
    profiles, the plugin record and the KV cache), with stand-in plan bytes: no GPU needed."""
    from setok.backends.trt.profiles import Limits, stage_profiles

    m = M.load_manifest(tiny_bundle)
    folder = tmp_path_factory.mktemp("engines") / "e"
    folder.mkdir()
    limits = Limits.from_manifest(m, 2)
    entries = []
    for s in m.stages:
        if s.form_of:
            continue
        (folder / f"{s.name}.plan").write_bytes(b"plan:" + s.name.encode())
        aot = {"id": M.CLUSTER_OP.id, "module": E.PLUGIN_MODULE, "impl": "aot"}
        plugin = aot if any(f.custom_op for f in m.forms(s.name)) else None  # built from the plugin form
        entries.append(E.EngineEntry(s.name, f"{s.name}.plan", M.sha256(folder / f"{s.name}.plan"), s.file, "fp16",
                                     s.inputs, s.outputs, stage_profiles(s.inputs, limits, s.name), plugin,
                                     s.kv_cache.to_dict() if s.kv_cache.past else None))
    E.EnginesManifest("10.8.0.43", "NVIDIA H100 80GB HBM3", (9, 0), "fp16", M.sha256(tiny_bundle / M.MANIFEST), entries,
                      timing_cache="cache.bin").write(folder)
    E.load_engines_manifest(folder)
    return folder


def test_every_engines_field_refuses_every_wrong_json_type(engines_dir):
    doc = json.loads((engines_dir / E.ENGINES_MANIFEST).read_text())
    n = 0
    for path, where, d in retype_cases(doc, ENGINES_NAMED, ENGINES_UNIONS, skip=("schema_version",)):
        with pytest.raises(M.FieldError) as e:
            E.check_engines(d)
        assert str(e.value).startswith(f"{where}: got "), (path, str(e.value))
        n += 1
    assert n > 2000, n


def test_engines_profiles_must_fit_their_tensors(engines_dir):
    doc = json.loads((engines_dir / E.ENGINES_MANIFEST).read_text())
    llm = next(e for e in doc["engines"] if e["stage"] == "llm")
    cases = {
        "one profile short": (lambda d: d["inputs"][0]["profiles"].pop(), "engines.llm.inputs[0].profiles: got"),
        "rank": (lambda d: d["inputs"][0]["profiles"][0]["min"].pop(), "engines.llm.inputs[0].profiles[0].min: got"),
        "min > max": (lambda d: d["inputs"][0]["profiles"][0].update(min=[9, 9, 9]), "min <= opt <= max at axis"),
        "fixed dim": (lambda d: d["inputs"][0]["profiles"][0]["max"].__setitem__(2, 1), "min = opt = max = "),
        "duplicate name": (lambda d: d["profiles"].__setitem__(1, d["profiles"][0]), "profile names that differ"),
    }
    for change, message in cases.values():
        d = copy.deepcopy(doc)
        change(next(e for e in d["engines"] if e["stage"] == "llm"))
        with pytest.raises(M.FieldError, match=re.escape(message)):
            E.check_engines(d)
    assert llm["profiles"] == ["prefill", "decode"]


def test_structured_engines_fuzz_through_the_reader_and_export_triton(engines_dir, tiny_bundle, tmp_path):
    """Mutated engines.json: the reader and the compatibility check raise EnginesError or pass;
    `setok export-triton ENGINES --bundle B` exits 0 or 2 with one line."""
    import shutil

    doc = json.loads((engines_dir / E.ENGINES_MANIFEST).read_text())
    folder = tmp_path / "e"
    shutil.copytree(engines_dir, folder)
    paths = [p for p, _ in nodes(doc) if p != ("schema_version",)]
    engine_paths = [p for p in paths if p[0] == "engines"]
    refused = []

    @settings(max_examples=200, **MUTATION_SETTINGS)
    @given(case=mutations(doc, paths, engine_paths), cli=st.integers(0, 9))
    def one(case, cli):
        (folder / E.ENGINES_MANIFEST).write_text(json.dumps(case[0]))
        try:
            m = E.load_engines_manifest(folder)
            E.check_compatible(m, "10.8.0.43", (9, 0), "NVIDIA H100 80GB HBM3")
        except E.EnginesError as e:
            assert len(str(e).splitlines()) == 1
            refused.append(str(e))
        if cli == 0:  # one case in ten also through the CLI (it copies the bundle's files)
            result = run_cli("export-triton", folder, "--bundle", tiny_bundle, "--out", tmp_path / "repo")
            if result.exit_code != 0:
                one_line_error(result)

    one()
    assert len(refused) >= 100 and sum("engines.json: engines." in m for m in refused) >= 0.4 * len(refused)


def test_setok_errors_are_the_only_escape():
    """The classes the readers raise are SetokErrors (the CLI's one-line path), BundleErrors both."""
    assert issubclass(E.EnginesError, M.BundleError) and issubclass(M.BundleError, SetokError)
