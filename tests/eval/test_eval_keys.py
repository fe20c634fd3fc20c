"""`setok eval`'s judge keys on a tiny run: present, in [0, 1], and the old keys unchanged."""

from setok.eval.evaluation import evaluate_checkpoint, summarize
from setok.eval.judge import JUDGE_KEYS

OLD_KEYS = {
    "fg_ari", "tokens_mean", "tokens_objects_spearman", "vqa_accuracy", "caption_exact", "recon_psnr",
    "baseline_psnr", "refseg_miou", "refseg_miou_patch", "gen_psnr", "pixel_dpc_fg_ari", "patches", "gen_ceiling_psnr",
}


def test_eval_reports_the_judge_keys_in_unit_range(tiny_ckpt):
    metrics = evaluate_checkpoint(tiny_ckpt, n=6, batch=3)
    assert OLD_KEYS | set(JUDGE_KEYS) <= set(metrics)
    assert metrics["judgeable"] > 0, "some of 6 held-out scenes must be judgeable"
    for key in JUDGE_KEYS:
        assert 0.0 <= metrics[key] <= 1.0, (key, metrics[key])


def test_judge_keys_are_null_when_no_scene_is_judgeable():
    rows = {"tokens": [3], "objects": [2], "fg_ari": [1.0], "judgeable": [0.0]}
    out = summarize(rows | {k: [] for k in JUDGE_KEYS if k != "judgeable"})
    assert out["judgeable"] == 0.0 and all(out[k] is None for k in JUDGE_KEYS if k != "judgeable")
