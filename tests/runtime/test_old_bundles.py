"""Bundles written before the manifest carried the contract names (`form_of`, `extra.kv_cache`,
`extra.op_version`) still load and answer exactly like new ones: the runtime falls back to the
names it used then."""

import json
import shutil

import numpy as np

from setok import manifest as M
from setok.data.items import eval_items
from setok.runtime import Pipeline


def _as_written_before(bundle, dest):
    shutil.copytree(bundle, dest)
    path = dest / M.MANIFEST
    d = json.loads(path.read_text())
    for s in d["stages"]:
        s.pop("form_of", None)
        extra = s.get("extra", {})
        extra.pop("kv_cache", None)
        extra.pop("op_version", None)
        if not extra:
            s.pop("extra", None)
    path.write_text(json.dumps(d, indent=2))
    return dest


def test_an_old_manifest_gives_the_same_contract_and_answers(tiny_bundle, tmp_path):
    old = _as_written_before(tiny_bundle, tmp_path / "old")
    raw = json.loads((old / M.MANIFEST).read_text())
    assert not any("form_of" in s or "kv_cache" in s.get("extra", {}) for s in raw["stages"])
    new_m, old_m = M.load_manifest(tiny_bundle), M.load_manifest(old)
    assert old_m.stage("llm").kv_cache == new_m.stage("llm").kv_cache
    assert len(old_m.stage("llm").kv_cache.past) == 2 * new_m.text["num_layers"]
    assert [s.name for s in old_m.forms("cluster")] == [s.name for s in new_m.forms("cluster")] == ["cluster", "cluster_plugin"]
    a, b = Pipeline.open(tiny_bundle, threads=1), Pipeline.open(old, threads=1)
    for it in eval_items(4, seed=5):
        ta, tb = a.tokenize(it.image), b.tokenize(it.image, cluster_stage="cluster_plugin")
        np.testing.assert_array_equal(ta.assignment, tb.assignment)
        assert a.answer(ta, it.qa[0][0]).text == b.answer(tb, it.qa[0][0]).text
        assert a.caption(ta).token_ids == b.caption(tb).token_ids
