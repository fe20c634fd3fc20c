"""Shapes, checkpoint round trip and the dynamic token count through the real modules."""

import json

import numpy as np
import pytest
import torch

from setok.config import SetokimConfig, preset
from setok.data.items import eval_items
from setok.errors import CheckpointError, InputError
from setok.model.encoder import preprocess
from setok.model.layers import patchify, unpatchify
from setok.model.setokim import CAPTION_PROMPT, QUESTION_PROMPT, REFER_PROMPT, Setokim
from setok.model.text import IM_END, IM_START, TARGET, train_text_tokenizer
from setok.model.vision import VisionTokenizer


def images(n=3):
    return preprocess(torch.from_numpy(np.stack([it.image for it in eval_items(n, seed=5)])))


@pytest.mark.parametrize("tokenizer", ["setok", "patch", "topk"])
def test_vision_shapes(tokenizer):
    cfg = preset("tiny", tokenizer)
    vt = VisionTokenizer(cfg)(images())
    n, t = cfg.encoder.num_patches, cfg.max_tokens
    assert vt.features.shape == (3, n, cfg.encoder.width)
    assert vt.tokens.shape == (3, t, cfg.merger.token_dim)
    assert vt.clusters.assignment.shape == (3, n)
    counts = vt.clusters.num_tokens
    if tokenizer == "patch":
        assert counts.tolist() == [n] * 3
    if tokenizer == "topk":
        assert counts.tolist() == [cfg.topk_tokens] * 3
    for b in range(3):  # rows past num_tokens are exactly zero (never read as tokens)
        assert torch.all(vt.tokens[b, counts[b]:] == 0)
    recon = VisionTokenizer(cfg).reconstruct(vt)
    assert recon.shape == (3, 3, 64, 64)


def test_patchify_round_trip():
    x = torch.randn(2, 3, 16, 16)
    assert patchify(x, 4).shape == (2, 16, 48)
    assert torch.equal(unpatchify(patchify(x, 4), 4), x)


def test_merger_inner_pass_is_per_cluster():
    """One masked pass equals running each cluster alone (the block-diagonal claim)."""
    cfg = preset("tiny")
    vt = VisionTokenizer(cfg).eval()
    feats = torch.randn(1, 12, cfg.encoder.width)
    assignment = torch.tensor([[0, 1, 0, 2, 1, 0, 2, 2, 1, 0, 1, 2]])
    blk = vt.merger.inner[0]
    same = assignment.unsqueeze(2) == assignment.unsqueeze(1)
    joint = blk(feats, mask=same)
    for c in range(3):
        idx = (assignment[0] == c).nonzero().squeeze(1)
        alone = blk(feats[:, idx])
        torch.testing.assert_close(joint[:, idx], alone, atol=1e-5, rtol=1e-5)


def test_llm_sees_exactly_num_tokens(tiny_ckpt):
    model = Setokim.from_pretrained(tiny_ckpt)
    vt = model.vision(images(2))
    for b in range(2):
        k = int(vt.clusters.num_tokens[b])
        seq = model.prompt(vt.tokens[b, :k], CAPTION_PROMPT)
        assert seq.ids.count(-1) == k
        assert seq.ids[1] == model.ids[IM_START]


def test_question_and_expression_come_before_the_image(tiny_ckpt):
    model = Setokim.from_pretrained(tiny_ckpt)
    vision = torch.zeros(3, model.cfg.merger.token_dim)
    q, e = "what color is the square", "the red circle"
    for template, fields, text in [(QUESTION_PROMPT, {"q": q}, q), (REFER_PROMPT, {"e": e}, e)]:
        ids = model.prompt(vision, template, **fields).ids
        start = ids.index(model.ids[IM_START])
        assert ids[start + 1 : start + 4] == [-1, -1, -1] and ids[start + 4] == model.ids[IM_END]
        assert model.tok.decode(ids[1:start]).endswith(text)  # read before any vision token
    # `setok train` gives the prompts' own words one id each
    assert [len(model.encode_text(w)) for w in ("caption", "question", "answer", "find", "draw")] == [1] * 5


def test_checkpoint_round_trip(tiny_ckpt, tmp_path):
    model = Setokim.from_pretrained(tiny_ckpt)
    model.save_pretrained(tmp_path / "copy")
    again = Setokim.from_pretrained(tmp_path / "copy")
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    assert not list(tmp_path.glob(".copy.tmp-*")), "no temp directory left behind"
    assert not list((tmp_path / "copy").glob("*.bin")) and not list((tmp_path / "copy").glob("*.pt"))
    cfg = json.loads((tmp_path / "copy" / "config.json").read_text())
    assert SetokimConfig.from_dict(cfg).cluster.tau == model.cfg.cluster.tau


def test_corrupt_checkpoint_is_refused(tiny_ckpt, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_ckpt, bad)
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        Setokim.from_pretrained(bad)
    (bad / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing model.safetensors"):
        Setokim.from_pretrained(bad)


def test_config_rejects_unknown_keys():
    data = preset("tiny").to_dict()
    data["cluster"]["tua"] = 0.3
    with pytest.raises(InputError, match="tua"):
        SetokimConfig.from_dict(data)


def test_text_tokenizer_round_trips_and_has_specials():
    tok = train_text_tokenizer(["a large red circle at top left, a small blue square"] * 3, 200)
    s = "a small blue square at top left, a large red circle"
    assert tok.decode(tok(s)["input_ids"]) == s
    assert "token_type_ids" not in tok(s)
    assert tok.convert_tokens_to_ids(TARGET) != tok.unk_token_id


def test_generation_count_is_chosen_by_the_llm(tiny_ckpt):
    model = Setokim.from_pretrained(tiny_ckpt)
    tokens, counts = model.generate_tokens(["a small red circle at center on a navy gradient"])
    assert tokens.shape == (1, model.cfg.max_tokens, model.cfg.merger.token_dim)
    assert 1 <= int(counts[0]) <= model.cfg.max_tokens


def _merger_tokens(shape_code: bool, cells: list[tuple[int, int]]) -> torch.Tensor:
    """Token 1 of a merger (no inter block) for an object covering `cells` of an 8x8 grid, with
    every object patch carrying the same feature vector: only the cluster's geometry differs."""
    from setok.config import MergerConfig
    from setok.model.merger import Merger

    torch.manual_seed(0)
    merger = Merger(MergerConfig(inter_depth=0, heads=2, token_dim=16, shape_code=shape_code), 32, 4, 8).eval()
    assignment = torch.zeros(1, 64, dtype=torch.long)
    for y, x in cells:
        assignment[0, y * 8 + x] = 1
    feats = torch.where(assignment.unsqueeze(-1) == 1, torch.ones(32), -torch.ones(32))  # (1, 64, 32)
    with torch.no_grad():
        return merger(feats, assignment, torch.tensor([2]))[0, 1, 2:]  # dims 0-1 are the centroid


def test_shape_code_carries_the_cluster_shape_and_not_its_position():
    square = [(y, x) for y in range(2, 5) for x in range(2, 5)]
    plus = [(3, 1), (3, 2), (3, 3), (2, 2), (4, 2), (1, 2), (5, 2), (3, 0), (3, 4)]  # 9 patches too
    moved = [(y + 3, x + 2) for y, x in square]
    assert torch.allclose(_merger_tokens(False, square), _merger_tokens(False, plus), atol=1e-6)  # mean of equal rows
    assert not torch.allclose(_merger_tokens(True, square), _merger_tokens(True, plus), atol=1e-3)
    assert torch.allclose(_merger_tokens(True, square), _merger_tokens(True, moved), atol=1e-5)


def test_tune_merger_trains_merger_and_detokenizer_but_never_the_encoder(tmp_path):
    from setok.data.items import item_stream
    from setok.train import Trainer, TrainOptions

    cfg = preset("tiny")
    stream = item_stream("synthetic", cfg.encoder.image_size, 0)
    model = Setokim(cfg, train_text_tokenizer(stream.corpus(), cfg.llm.vocab_size))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opts = TrainOptions(preset="tiny", out=tmp_path / "ck", steps=4, batch_size=4, tune_merger=True)
    trainer = Trainer(model, opts, stream, {"stage": 2, "step": 0, "elapsed": 0.0})
    losses = trainer.step_stage2(0)
    assert "recon" in losses and "lm" in losses
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert not any(n.startswith("vision.encoder.") for n in changed)
    assert any(n.startswith("vision.merger.") for n in changed) and any(n.startswith("vision.detokenizer.") for n in changed)
    assert any(n.startswith("llm.") for n in changed)


def test_grouping_pull_counts_each_group_once():
    from setok.model.cluster import pairwise_distance
    from setok.model.losses import grouping_loss

    torch.manual_seed(0)
    # 12 background patches almost equal, 4 object patches spread: a per-pair mean would be
    # dominated by the tight background; the per-group mean is the average of the two groups.
    content = torch.cat([torch.randn(1, 1, 8).expand(1, 12, 8) + 0.01 * torch.randn(1, 12, 8),
                         torch.randn(1, 4, 8) + 5.0], 1)  # (1, 16, 8)
    labels = torch.tensor([[0] * 12 + [1] * 4])
    d2 = pairwise_distance(content)[0] ** 2
    per_group = 0.5 * (d2[:12, :12].mean() + d2[12:, 12:].mean())
    push = torch.relu(1.0 - pairwise_distance(content)[0][:12, 12:]) ** 2
    assert torch.allclose(grouping_loss(content, labels), per_group + push.mean(), rtol=1e-5)
    per_pair = d2[labels[0].unsqueeze(1) == labels[0]].mean()
    assert per_group > 2 * per_pair  # the object's spread is not drowned by the background's pairs


def test_bucketed_losses_equal_one_padded_batch(tiny_ckpt):
    import random

    from setok.train.sequences import task_sequences

    model = Setokim.from_pretrained(tiny_ckpt)
    items = eval_items(4, seed=2)
    with torch.no_grad():
        vt = model.vision(preprocess(torch.from_numpy(np.stack([it.image for it in items]))))
    seqs = []
    for i, it in enumerate(items):
        k = int(vt.clusters.num_tokens[i])
        seqs += task_sequences(model, it, vt.tokens[i, :k], vt.clusters.assignment[i], random.Random(i))
    assert len({len(s.ids) for s in seqs}) > 3  # lengths differ, so the buckets pad differently
    one, four = model.losses(seqs, buckets=1), model.losses(seqs, buckets=4)
    assert list(one) == ["lm", "regress", "seg"] == list(four)
    for name in one:
        assert torch.allclose(one[name], four[name], rtol=1e-4, atol=1e-6), name


def test_generation_targets_follow_the_caption_then_background():
    from setok.model.losses import patch_labels
    from setok.train.sequences import generation_order

    it = next(it for it in eval_items(40, seed=3) if it.num_objects >= 3)
    labels = patch_labels(torch.from_numpy(it.instance_mask)[None], 4)[0]  # (N,)
    # Clusters = the instances, numbered in raster order of first patch (as DPC numbers them),
    # with the background split in two halves so there are several background tokens.
    region = torch.where(labels > 0, labels, torch.where(torch.arange(labels.numel()) < labels.numel() // 2, -1, -2))
    firsts = sorted({int(r): i for i, r in reversed(list(enumerate(region.tolist())))}.items(), key=lambda kv: kv[1])
    token_of = {r: t for t, (r, _) in enumerate(firsts)}
    assignment = torch.tensor([token_of[int(r)] for r in region])
    order = generation_order(it, assignment, len(firsts), 4).tolist()
    owners = [firsts[t][0] for t in order]
    assert owners[: it.num_objects] == list(range(1, it.num_objects + 1))  # caption order
    assert owners[it.num_objects :] == [-1, -2]  # background last, raster order
    assert owners != [r for r, _ in firsts]  # raster order alone would differ here


def test_relation_questions_are_drawn_more_often():
    import random
    from collections import Counter

    from setok.train.sequences import RELATION_WEIGHT, qa_weight, weighted_sample

    items = [it for it in eval_items(200, seed=4) if any(qa_weight(q) > 1 for q, _ in it.qa)]
    kinds = Counter()
    for i, it in enumerate(items):
        drawn = weighted_sample(it.qa, [qa_weight(q) for q, _ in it.qa], 3, random.Random(i))
        assert len(drawn) == min(3, len(it.qa)) and not Counter(drawn) - Counter(it.qa)  # without replacement
        kinds.update(qa_weight(q) > 1 for q, _ in drawn)
    share = sum(qa_weight(q) > 1 for it in items for q, _ in it.qa) / sum(len(it.qa) for it in items)
    assert RELATION_WEIGHT > 1 and kinds[True] / sum(kinds.values()) > share + 0.05  # measured: 0.39 of all, 0.48 of drawn


def test_projector_adds_position_on_its_own_path_starting_at_zero():
    from setok.model.setokim import Projector

    proj = Projector(8, 16)
    tokens = torch.rand(5, 8)  # (K, D); dims 0-1 are the centroid
    assert torch.equal(proj(tokens), proj.mlp(tokens))  # a new path changes nothing at first
    torch.nn.init.normal_(proj.where.weight)
    moved = tokens.clone()
    moved[:, 0] += 0.25  # x only
    assert not torch.allclose(proj(moved) - proj.mlp(moved), proj(tokens) - proj.mlp(tokens))


def test_detokenizer_reach_is_per_token_and_starts_shared():
    from setok.config import DetokenizerConfig, EncoderConfig
    from setok.model.detokenizer import Detokenizer

    det = Detokenizer(DetokenizerConfig(width=16, depth=1, heads=2), EncoderConfig(), token_dim=8)
    tokens = torch.rand(1, 3, 8)  # (B, T, D); dims 0-1 are the centroid
    tokens[0, 1, :2] = tokens[0, 0, :2]  # two tokens at one place, different content
    bias = det.cross_bias(tokens, torch.tensor([3]))  # (B, heads, N, T)
    assert torch.equal(bias[..., 0], bias[..., 1])  # at first only the place matters
    torch.nn.init.normal_(det.reach.weight)
    bias = det.cross_bias(tokens, torch.tensor([3]))
    assert not torch.allclose(bias[..., 0], bias[..., 1])  # then each token sets its own reach
    assert (bias[..., 0] <= 0).all()  # still a locality prior: never a pull towards far patches


def _footprint_iou(shape_field: bool, mask: torch.Tensor) -> float:
    """Fit one token's attention footprint (head 0's logit against a learned threshold) to `mask`
    over the 16 x 16 patches; the IoU of the footprint the fit reaches."""
    from setok.config import DetokenizerConfig, EncoderConfig
    from setok.model.detokenizer import Detokenizer

    torch.manual_seed(0)
    det = Detokenizer(DetokenizerConfig(width=16, depth=1, heads=2, shape_field=shape_field), EncoderConfig(), token_dim=8)
    token = torch.zeros(1, 1, 8)
    token[0, 0, :2] = 0.5  # the centroid
    token[0, 0, 2] = 1.0  # content the reach and the field read
    shift = torch.zeros((), requires_grad=True)
    opt = torch.optim.Adam([*det.parameters(), shift], lr=0.05)
    for _ in range(300):
        logit = det.cross_bias(token, torch.tensor([1]))[0, 0, :, 0] + shift  # (N,)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
    inside = (det.cross_bias(token, torch.tensor([1]))[0, 0, :, 0] + shift > 0).float()
    return float((inside * mask).sum() / ((inside + mask) > 0).sum())


def test_the_shape_field_gives_a_token_a_footprint_that_is_not_a_disc():
    """Without the field a token's footprint falls off with distance alone, so every object is drawn
    round; with it a token can claim a triangle. Zero-initialised, it starts as the disc."""
    from setok.config import DetokenizerConfig, EncoderConfig
    from setok.model.detokenizer import Detokenizer
    from setok.model.merger import patch_coords

    xy = patch_coords(16)  # (N, 2)
    x, y = xy[:, 0], xy[:, 1]
    triangle = ((y < 0.8) & (y > 0.2 + 2 * (x - 0.5).abs())).float()  # apex up, base at y = 0.8
    disc, field = _footprint_iou(False, triangle), _footprint_iou(True, triangle)
    assert field > 0.9 and field > disc + 0.1, (disc, field)

    tokens, counts = torch.rand(2, 4, 8), torch.tensor([4, 2])
    built = {}
    for on in (False, True):
        torch.manual_seed(0)
        built[on] = Detokenizer(DetokenizerConfig(width=16, depth=1, heads=2, shape_field=on), EncoderConfig(), token_dim=8)
    theirs = dict(built[True].named_parameters())
    assert all(torch.equal(p, theirs[n]) for n, p in built[False].named_parameters())
    assert torch.equal(built[False](tokens, counts), built[True](tokens, counts))


def test_the_offset_field_factorises_into_a_point_code_times_a_centre_code():
    """offset_logits never builds the (B, T, P, 40) code of every offset, and gives what it would."""
    from setok.model.merger import offset_code, offset_logits, patch_coords

    torch.manual_seed(0)
    points, centres, weights = patch_coords(16), torch.rand(2, 5, 2), torch.randn(2, 5, 3, 40)  # (P,2) (B,T,2) (B,T,H,40)
    full = offset_code(points.unsqueeze(0) - centres[..., None, :]) @ weights.transpose(2, 3)  # (B, T, P, H)
    assert torch.allclose(offset_logits(points, centres, weights), full.permute(0, 3, 2, 1), atol=1e-4)


def test_the_shipped_checkpoint_is_what_the_demo_runs_and_it_loads(tmp_path):
    """The package ships `small`: `setok demo` must find it (not fall back to training tiny) and
    this version must load it."""
    from setok.cli.demo import default_checkpoint
    from setok.config import SHIPPED_CHECKPOINT

    said = []
    assert default_checkpoint(tmp_path, said.append) == SHIPPED_CHECKPOINT and not said
    model = Setokim.from_pretrained(SHIPPED_CHECKPOINT)
    assert model.cfg.preset == "small" and model.cfg.merger.shape_code


def test_the_place_head_sets_dims_0_1_from_the_chosen_cell():
    """With a place head, a generated token's (x, y) is the most likely cell's; the rest is the
    regression's. Trained on its loss it learns cells and positions. Without it (checkpoints from
    before, place_head false) the tokens are the regression's alone."""
    from setok.config import preset
    from setok.model.setokim import PlaceHead, Setokim, TokenHead, cell_of
    from setok.model.text import train_text_tokenizer

    assert cell_of(torch.tensor([[0.1, 0.1], [0.9, 0.1], [0.5, 0.5], [0.0, 1.0]])).tolist() == [0, 2, 4, 6]
    torch.manual_seed(0)
    head = PlaceHead(16)
    h, xy = torch.randn(12, 16), torch.rand(12, 2)
    logits, per_cell = head(h)
    assert torch.equal(head.place(h), per_cell[torch.arange(12), logits.argmax(-1)])
    opt = torch.optim.Adam(head.parameters(), 1e-2)
    for _ in range(300):
        opt.zero_grad()
        head.loss_sum(h, xy).backward()
        opt.step()
    assert torch.equal(cell_of(head.place(h)), cell_of(xy))
    assert (head.place(h) - xy).abs().max() < 0.05

    cfg = preset("tiny")
    cfg.place_head = False
    plain = Setokim(cfg, train_text_tokenizer(["a red circle", "a blue square"], 64))
    assert plain.place is None and "place" not in {n.split(".")[0] for n, _ in plain.named_parameters()}
    hid = torch.randn(3, plain.llm.config.hidden_size)
    assert torch.equal(TokenHead(plain)(hid), plain.regress(hid))


def test_the_place_head_leaves_every_other_draw_as_it_was():
    """A head run differs from a plain run by the head alone: the same seed gives the same weights
    elsewhere and leaves the RNG where a plain build leaves it (the trainer draws its contrastive
    head next; when it moved, stage 1 calibrated another tau)."""
    tok = train_text_tokenizer(["a red circle", "a blue square"], 64)
    built = {}
    for head in (False, True):
        cfg = preset("tiny")
        cfg.place_head = head
        torch.manual_seed(0)
        built[head] = (Setokim(cfg, tok), torch.rand(4))
    (plain, after_plain), (placed, after_placed) = built[False], built[True]
    assert placed.place is not None and torch.equal(after_plain, after_placed)
    theirs = dict(placed.named_parameters())
    for name, p in plain.named_parameters():
        assert torch.equal(p, theirs[name]), name


def test_clustering_stays_float32_under_a_bf16_autocast():
    """`setok train --precision bf16` autocasts the forward passes; the clusters must be the ones
    float32 inference computes (a bf16 x.y in the distances clustered every image differently)."""
    from setok.model.cluster import dpc_knn

    model = Setokim.from_pretrained("setok/checkpoints/small").eval()
    with torch.no_grad():
        features = model.vision.encoder(preprocess(torch.from_numpy(np.stack([it.image for it in eval_items(16, seed=3)]))))
        ref = model.vision.cluster(features)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            raw = dpc_knn(features, model.cfg.cluster)  # the premise: bf16 distances change the clusters
            got = model.vision.cluster(features)
    assert not torch.equal(raw.assignment, ref.assignment)
    assert torch.equal(got.assignment, ref.assignment) and torch.equal(got.num_tokens, ref.num_tokens)
