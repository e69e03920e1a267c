"""Loss values against naive re-computations (explicit loops and ``math``), switches, gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cisslib.losses import (
    CISSCriterion,
    LossWeights,
    cacp_loss,
    class_prototypes,
    dice_loss,
    gpd_loss,
    make_pseudolabels,
    mask_losses,
    num_masks_across_ranks,
    query_distillation,
    sigmoid_focal_loss,
    targets_from_labels,
)

# ---------------------------------------------------------------------------------------------
# Naive references (plain Python)
# ---------------------------------------------------------------------------------------------

# SPEC 2 weights (the config's defaults), written out: the criterion has no defaults of its own
SPEC_WEIGHTS = LossWeights(ce=5.0, mask=50.0, dice=1.0, gpd=1.0, qd=0.15)


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def naive_focal(logits, targets, num_masks, alpha=0.25, gamma=2.0, valid=None):
    total = 0.0
    for m in range(len(logits)):
        acc, n = 0.0, 0
        for i, (x, t) in enumerate(zip(logits[m], targets[m], strict=True)):
            if valid is not None and not valid[m][i]:
                continue
            p = sig(x)
            ce = -(t * math.log(p) + (1 - t) * math.log(1 - p))
            p_t = p if t == 1 else 1 - p
            a_t = alpha if t == 1 else 1 - alpha
            acc += a_t * ce * (1 - p_t) ** gamma
            n += 1
        total += acc / max(n, 1)
    return total / num_masks


def naive_dice(logits, targets, num_masks, valid=None):
    total = 0.0
    for m in range(len(logits)):
        inter = sp = st = 0.0
        for i, (x, t) in enumerate(zip(logits[m], targets[m], strict=True)):
            if valid is not None and not valid[m][i]:
                continue
            p = sig(x)
            inter += p * t
            sp += p
            st += t
        total += 1 - (2 * inter + 1) / (sp + st + 1)
    return total / num_masks


def interp1(values, n_out):
    """Linear resize, align_corners=False (source index clamped at 0), as in PyTorch."""
    n_in = len(values)
    out = []
    for o in range(n_out):
        src = max((o + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = int(math.floor(src))
        i1 = min(i0 + 1, n_in - 1)
        lam = src - i0
        out.append((1 - lam) * values[i0] + lam * values[i1])
    return out


def bilinear(grid, h_out, w_out):
    rows = [interp1(r, w_out) for r in grid]
    cols = [interp1([rows[i][x] for i in range(len(rows))], h_out) for x in range(w_out)]
    return [[cols[x][y] for x in range(w_out)] for y in range(h_out)]


def naive_masked_mean_upsampled(dense_b, mask):
    """dense_b: (D, h, w) nested lists; mask: (H, W) 0/1 nested lists -> D floats."""
    H, W = len(mask), len(mask[0])
    ups = [bilinear(ch, H, W) for ch in dense_b]
    n = sum(sum(r) for r in mask)
    return [sum(u[y][x] * mask[y][x] for y in range(H) for x in range(W)) / n for u in ups]


def naive_masked_mean_area(dense_b, mask):
    """Masks averaged over (H/h x W/w) blocks, then a weighted mean of the features."""
    h, w = len(dense_b[0]), len(dense_b[0][0])
    H, W = len(mask), len(mask[0])
    fy, fx = H // h, W // w
    wts = [
        [
            sum(mask[i * fy + a][j * fx + c] for a in range(fy) for c in range(fx)) / (fy * fx)
            for j in range(w)
        ]
        for i in range(h)
    ]
    tot = sum(sum(r) for r in wts)
    return [sum(ch[i][j] * wts[i][j] for i in range(h) for j in range(w)) / tot for ch in dense_b]


def normalise(v):
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def dot(a, b):
    return sum(x * y for x, y in zip(a, b, strict=True))


def naive_prototypes(dense, masks, pool_at="mask"):
    """dense: (B, D, h, w) lists; masks: per image list of (label, (H, W) 0/1 lists)."""
    fn = naive_masked_mean_upsampled if pool_at == "mask" else naive_masked_mean_area
    groups: dict[int, list[list[float]]] = {}
    for b, items in enumerate(masks):
        for label, m in items:
            groups.setdefault(label, []).append(fn(dense[b], m))
    out = {}
    for label, vecs in groups.items():
        mean = [sum(v[d] for v in vecs) / len(vecs) for d in range(len(vecs[0]))]
        out[label] = normalise(mean)
    return out


def naive_gpd(sd, rd, sg, rg, text, masks, reduction="sum", pool_at="mask"):
    ps = naive_prototypes(sd, masks, pool_at)
    pr = naive_prototypes(rd, masks, pool_at)
    terms = [(dot(ps[k], t) - dot(pr[k], t)) ** 2 for k in ps for t in text]
    term = sum(terms) if reduction == "sum" else sum(terms) / len(terms)
    kl = 0.0
    for g, gr in zip(sg, rg, strict=True):
        zs = [math.exp(dot(g, t)) for t in text]
        zr = [math.exp(dot(gr, t)) for t in text]
        q = [z / sum(zs) for z in zs]
        p = [z / sum(zr) for z in zr]
        kl += sum(pi * (math.log(pi) - math.log(qi + 1e-8)) for pi, qi in zip(p, q, strict=True))
    return term + kl / len(sg)


def to_lists(t: torch.Tensor):
    return t.detach().double().tolist()


# ---------------------------------------------------------------------------------------------
# Targets, focal, dice, CACP, mask losses
# ---------------------------------------------------------------------------------------------


def test_targets_from_labels_one_mask_per_class_void_negative():
    labels = torch.tensor(
        [[[0, 2, 2, 255], [3, 3, 0, 255]], [[0, 0, 0, 0], [255, 255, 0, 0]]], dtype=torch.long
    )
    t = targets_from_labels(labels, num_classes=3)
    assert t[0][0].tolist() == [1, 2]  # labels 2, 3 -> queries 1, 2
    assert t[0][1].tolist() == [
        [[False, True, True, False], [False, False, False, False]],
        [[False, False, False, False], [True, True, False, False]],
    ]
    assert t[1][0].numel() == 0 and t[1][1].shape == (0, 2, 4)
    with pytest.raises(ValueError, match=r"\[4\]"):
        targets_from_labels(torch.tensor([[[4, 0]]]), num_classes=3)


def test_focal_and_dice_match_naive_with_and_without_valid():
    logits = [[0.5, -1.0, 2.0, 0.0], [-0.3, 1.5, -2.0, 0.7]]
    targets = [[1, 0, 1, 0], [0, 1, 1, 0]]
    valid = [[True, True, False, True], [True, False, True, True]]
    lt, tt = torch.tensor(logits), torch.tensor(targets, dtype=torch.float32)
    vt = torch.tensor(valid)
    assert sigmoid_focal_loss(lt, tt, 3.0).item() == pytest.approx(
        naive_focal(logits, targets, 3.0), rel=1e-6
    )
    assert sigmoid_focal_loss(lt, tt, 2.0, alpha=0.6, gamma=1.0).item() == pytest.approx(
        naive_focal(logits, targets, 2.0, alpha=0.6, gamma=1.0), rel=1e-6
    )
    assert sigmoid_focal_loss(lt, tt, 3.0, valid=vt).item() == pytest.approx(
        naive_focal(logits, targets, 3.0, valid=valid), rel=1e-6
    )
    assert dice_loss(lt, tt, 3.0).item() == pytest.approx(
        naive_dice(logits, targets, 3.0), rel=1e-6
    )
    assert dice_loss(lt, tt, 3.0, valid=vt).item() == pytest.approx(
        naive_dice(logits, targets, 3.0, valid=valid), rel=1e-6
    )


def naive_cacp(logits, present, first_new):
    tot, n = 0.0, 0
    for b in range(len(logits)):
        for c in range(first_new, len(logits[b])):
            z0, z1 = logits[b][c]
            lse = math.log(math.exp(z0) + math.exp(z1))
            tot += lse - (z0 if present[b][c] else z1)
            n += 1
    return tot / n


def test_cacp_value_and_no_gradient_from_old_columns():
    logits = [[[1.0, -1.0], [0.2, 0.3], [-2.0, 1.0]], [[0.0, 0.5], [3.0, 1.0], [0.1, -0.4]]]
    present = [[True, False, True], [False, True, False]]
    lt = torch.tensor(logits, requires_grad=True)
    pt = torch.tensor(present)
    assert cacp_loss(lt, pt).item() == pytest.approx(naive_cacp(logits, present, 0), rel=1e-6)
    loss = cacp_loss(lt, pt, first_new=1)
    assert loss.item() == pytest.approx(naive_cacp(logits, present, 1), rel=1e-6)
    loss.backward()
    assert torch.all(lt.grad[:, 0] == 0)
    assert torch.all(lt.grad[:, 1:].abs().sum(-1) > 0)
    with pytest.raises(ValueError, match="first_new=3"):
        cacp_loss(lt, pt, first_new=3)


def test_mask_losses_match_query_upsample_and_gradient():
    gen = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 3, 2, 2, generator=gen, requires_grad=True)
    labels = torch.tensor(
        [
            [[2, 2, 0, 0], [2, 0, 0, 0], [0, 0, 3, 3], [0, 255, 3, 3]],
            [[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]],
        ]
    )
    targets = targets_from_labels(labels, 3)
    focal, dice = mask_losses(pred, targets, 3.0, (4, 4))
    # naive: query label-1, bilinear 2x2 -> 4x4 in Python, void pixel negative
    logit_rows, target_rows = [], []
    for b, labs in enumerate([[2, 3], [1]]):
        for lab in labs:
            up = bilinear(to_lists(pred[b, lab - 1]), 4, 4)
            logit_rows.append([v for r in up for v in r])
            target_rows.append([int(v == lab) for r in labels[b].tolist() for v in r])
    assert focal.item() == pytest.approx(naive_focal(logit_rows, target_rows, 3.0), rel=1e-5)
    assert dice.item() == pytest.approx(naive_dice(logit_rows, target_rows, 3.0), rel=1e-5)
    (focal + dice).backward()
    used = torch.zeros(2, 3, dtype=torch.bool)
    used[0, 1] = used[0, 2] = used[1, 0] = True
    assert torch.all(pred.grad.abs().sum((-1, -2))[used] > 0)
    assert torch.all(pred.grad[~used] == 0)
    # ignore_void switch: the 255 pixel leaves the sums
    valid = labels != 255
    f2, d2 = mask_losses(pred.detach(), targets, 3.0, (4, 4), valid=valid)
    vrows = [[v != 255 for r in labels[b].tolist() for v in r] for b in (0, 0, 1)]
    assert f2.item() == pytest.approx(naive_focal(logit_rows, target_rows, 3.0, valid=vrows))
    assert d2.item() == pytest.approx(naive_dice(logit_rows, target_rows, 3.0, valid=vrows))
    assert f2.item() != pytest.approx(focal.item())


def test_num_masks_not_distributed():
    assert num_masks_across_ranks(0) == 1.0
    assert num_masks_across_ranks(7) == 7.0


# ---------------------------------------------------------------------------------------------
# Pseudo-labels, prototypes, GPD, QD
# ---------------------------------------------------------------------------------------------

# Image 0: GT classes 4 (2x2 block) and 5 (one pixel), one void pixel. Old model (3 classes):
# class 0 present and wins 9 of 16 pixels (> half), class 1 present and wins 2 (< half),
# class 2 absent (its strong mask must be ignored). Image 1: GT class 4 only, no old class present.
LABELS = torch.tensor(
    [
        [[4, 4, 0, 0], [4, 4, 0, 0], [5, 0, 0, 0], [0, 0, 0, 255]],
        [[0, 0, 4, 4], [0, 0, 4, 4], [0, 0, 4, 4], [0, 0, 4, 4]],
    ]
)
PSEUDO0 = [[0, 0, 0, 0], [0, 0, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1]]  # class 0 on image 0


def old_outputs_fixture(gen: torch.Generator) -> dict:
    logits = torch.tensor(
        [[[3.0, 0.0], [3.0, 0.0], [0.0, 3.0]], [[0.0, 3.0], [0.0, 3.0], [0.0, 3.0]]]
    )
    masks = torch.full((2, 3, 4, 4), -4.0)
    masks[0, 0] = 4.0
    masks[0, 0, 0, 2:] = -4.0
    masks[0, 1, 0, 2:] = 4.0
    masks[0, 2] = 8.0
    masks[1] = 4.0
    return {
        "pred_logits": logits,
        "pred_masks": masks,
        "queries": torch.randn(3, 2, 3, 6, generator=gen),
        "global_embedding": F.normalize(torch.randn(2, 3, generator=gen), dim=1),
        "dense_embedding": F.normalize(torch.randn(2, 3, 2, 2, generator=gen), dim=1),
    }


def test_pseudolabels_half_image_rule_and_threshold():
    old = old_outputs_fixture(torch.Generator().manual_seed(1))
    pseudo = make_pseudolabels(old, LABELS, threshold=0.0)
    assert pseudo[0][0].tolist() == [0]
    assert pseudo[0][1].int().tolist() == [PSEUDO0]  # void pixel (3,3) is pseudo-labelled
    assert pseudo[1][0].numel() == 0 and pseudo[1][1].shape == (0, 4, 4)
    # threshold 0.5: denominators become sigmoid(mask) >= .5 areas: class 0 -> 9/14 (its +4
    # region holds the 5 GT pixels), class 1 -> 2/2; both kept
    pseudo = make_pseudolabels(old, LABELS, threshold=0.5)
    assert pseudo[0][0].tolist() == [0, 1]
    assert pseudo[0][1][1].int().tolist() == [[0, 0, 1, 1], [0] * 4, [0] * 4, [0] * 4]
    # exactly half the image is not enough (strict > 0.5): class 1 takes pixel (1, 2) from class 0
    half = {k: v.clone() for k, v in old.items()}
    half["pred_masks"][0, 1, 1, 2] = 6.0
    assert make_pseudolabels(half, LABELS, threshold=0.0)[0][0].tolist() == []
    # class 1 now beats class 0 on rows 1-3: it wins all 11 non-GT pixels, class 0 none
    old["pred_masks"][0, 1, 1:, :] = 6.0
    pseudo = make_pseudolabels(old, LABELS, threshold=0.0)
    assert pseudo[0][0].tolist() == [1]
    assert pseudo[0][1].int().tolist() == [[[0, 0, 1, 1], [0, 0, 1, 1], [0, 1, 1, 1], [1] * 4]]
    # GT pixels are never pseudo-labelled, however strong the old mask there
    assert not (pseudo[0][1][0] & (LABELS[0] == 4)).any()


def test_class_prototypes_both_pool_modes_against_naive():
    gen = torch.Generator().manual_seed(2)
    dense = torch.randn(2, 3, 2, 2, generator=gen)
    masks = targets_from_labels(LABELS, 5)
    naive_masks = [
        [(int(i), m.int().tolist()) for i, m in zip(idx, mm, strict=True)] for idx, mm in masks
    ]
    for pool_at in ("mask", "feature"):
        labels, protos = class_prototypes(dense, masks, pool_at=pool_at)
        expect = naive_prototypes(to_lists(dense), naive_masks, pool_at)
        assert labels.tolist() == [3, 4]
        for row, lab in enumerate(labels.tolist()):
            assert protos[row].tolist() == pytest.approx(expect[lab], abs=1e-6)
    # the two pools differ on this case (the switch does something)
    _, pm = class_prototypes(dense, masks, pool_at="mask")
    _, pf = class_prototypes(dense, masks, pool_at="feature")
    assert not torch.allclose(pm, pf, atol=1e-3)
    # authors' path (features upsampled to the mask size) at a realistic scale ratio
    d2 = torch.randn(1, 4, 3, 5, generator=gen)
    m2 = torch.rand(2, 48, 80, generator=gen) > 0.6
    _, got = class_prototypes(d2, [(torch.tensor([0, 1]), m2)], pool_at="mask")
    up = F.interpolate(d2, size=(48, 80), mode="bilinear", align_corners=False)[0]
    want = torch.stack([F.normalize((up * m).sum((1, 2)) / m.sum(), dim=0) for m in m2])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="pool_at='pixel'"):
        class_prototypes(dense, masks, pool_at="pixel")


def gpd_inputs(seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    sd = F.normalize(torch.randn(2, 3, 2, 2, generator=gen), dim=1).requires_grad_()
    rd = F.normalize(torch.randn(2, 3, 2, 2, generator=gen), dim=1).requires_grad_()
    sg = F.normalize(torch.randn(2, 3, generator=gen), dim=1).requires_grad_()
    rg = F.normalize(torch.randn(2, 3, generator=gen), dim=1).requires_grad_()
    text = F.normalize(torch.randn(5, 3, generator=gen), dim=1).requires_grad_()
    return sd, rd, sg, rg, text


def gt_plus_pseudo_masks():
    gt = targets_from_labels(LABELS, 5)
    pseudo_mask = torch.tensor(PSEUDO0, dtype=torch.bool)[None]
    torch_masks = [
        (torch.cat([gt[0][0], torch.tensor([0])]), torch.cat([gt[0][1], pseudo_mask])),
        gt[1],
    ]
    lab = LABELS.tolist()
    naive = [
        [
            (3, [[int(v == 4) for v in r] for r in lab[0]]),
            (4, [[int(v == 5) for v in r] for r in lab[0]]),
            (0, PSEUDO0),
        ],
        [(3, [[int(v == 4) for v in r] for r in lab[1]])],
    ]
    return torch_masks, naive


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("pool_at", ["mask", "feature"])
def test_gpd_two_gt_one_pseudo_against_naive(reduction, pool_at):
    sd, rd, sg, rg, text = gpd_inputs()
    masks, naive_masks = gt_plus_pseudo_masks()
    got = gpd_loss(sd, rd, sg, rg, text, masks, reduction=reduction, pool_at=pool_at)
    want = naive_gpd(
        to_lists(sd),
        to_lists(rd),
        to_lists(sg),
        to_lists(rg),
        to_lists(text),
        naive_masks,
        reduction,
        pool_at,
    )
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_gpd_kl_uses_log_q_plus_epsilon():
    # large logits: the student's softmax underflows, where log(q + 1e-8) differs from log(q)
    sd, rd, sg, rg, text = gpd_inputs()
    sg, rg = 60.0 * sg.detach(), 60.0 * rg.detach()
    masks, naive_masks = gt_plus_pseudo_masks()
    got = gpd_loss(sd, rd, sg, rg, text, masks)
    want = naive_gpd(
        to_lists(sd), to_lists(rd), to_lists(sg), to_lists(rg), to_lists(text), naive_masks
    )
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_gpd_gradients_reach_student_only_and_zero_without_prototypes():
    sd, rd, sg, rg, text = gpd_inputs()
    masks, _ = gt_plus_pseudo_masks()
    gpd_loss(sd, rd, sg, rg, text, masks).backward()
    assert sd.grad is not None and sd.grad.abs().sum() > 0
    assert sg.grad is not None and sg.grad.abs().sum() > 0
    assert rd.grad is None and rg.grad is None and text.grad is None
    empty = [(torch.zeros(0, dtype=torch.long), torch.zeros(0, 4, 4, dtype=torch.bool))] * 2
    zero = gpd_loss(sd, rd, sg, rg, text, empty)
    assert zero.item() == 0.0 and zero.dim() == 0


def test_query_distillation_value_and_gradients():
    gen = torch.Generator().manual_seed(4)
    sq = torch.randn(3, 2, 4, 5, generator=gen, requires_grad=True)
    rq = torch.randn(3, 2, 2, 5, generator=gen, requires_grad=True)
    loss = query_distillation(sq, rq)
    s, r = to_lists(sq), to_lists(rq)
    terms = [
        sum((s[i][b][c][d] - r[i][b][c][d]) ** 2 for d in range(5))
        for i in range(3)
        for b in range(2)
        for c in range(2)
    ]
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-6)
    loss.backward()
    assert torch.all(sq.grad[:, :, :2].abs().sum(-1) > 0)
    assert torch.all(sq.grad[:, :, 2:] == 0)
    assert rq.grad is None
    with pytest.raises(ValueError, match="do not extend"):
        query_distillation(sq[:, :, :1], rq)


# ---------------------------------------------------------------------------------------------
# Criterion
# ---------------------------------------------------------------------------------------------


def student_outputs(seed: int, num_classes: int = 5, requires_grad: bool = True) -> dict:
    gen = torch.Generator().manual_seed(seed)

    def r(*shape, norm_dim=None):
        t = torch.randn(*shape, generator=gen)
        if norm_dim is not None:
            t = F.normalize(t, dim=norm_dim)
        return t.requires_grad_(requires_grad)

    return {
        "pred_logits": r(2, num_classes, 2),
        "pred_masks": r(2, num_classes, 4, 4),
        "aux_outputs": [{"pred_masks": r(2, num_classes, 2, 2)} for _ in range(2)],
        "queries": r(3, 2, num_classes, 6),
        "global_embedding": r(2, 3, norm_dim=1),
        "dense_embedding": r(2, 3, 2, 2, norm_dim=1),
        "text": F.normalize(torch.randn(num_classes, 3, generator=gen), dim=1),
    }


def test_criterion_incremental_step_terms_weights_and_total():
    out = student_outputs(5)
    old = old_outputs_fixture(torch.Generator().manual_seed(6))
    w = LossWeights(ce=2.0, mask=3.0, dice=0.5, gpd=0.7, qd=0.3)
    crit = CISSCriterion(w)
    losses = crit(out, LABELS, num_old=3, old_outputs=old)
    assert set(losses) == {
        "loss_ce", "loss_mask", "loss_dice", "loss_mask_0", "loss_dice_0", "loss_mask_1",
        "loss_dice_1", "loss_gpd", "loss_qd", "total",
    }  # fmt: skip
    targets = targets_from_labels(LABELS, 5)
    present = torch.zeros(2, 5, dtype=torch.bool)
    present[0, 3] = present[0, 4] = present[1, 3] = True
    n = 3.0  # GT masks only (pseudo-masks do not count)
    torch.testing.assert_close(losses["loss_ce"], 2.0 * cacp_loss(out["pred_logits"], present, 3))
    f, d = mask_losses(out["pred_masks"], targets, n, (4, 4))
    torch.testing.assert_close(losses["loss_mask"], 3.0 * f)
    torch.testing.assert_close(losses["loss_dice"], 0.5 * d)
    f1, d1 = mask_losses(out["aux_outputs"][1]["pred_masks"], targets, n, (4, 4))
    torch.testing.assert_close(losses["loss_mask_1"], 3.0 * f1)
    torch.testing.assert_close(losses["loss_dice_1"], 0.5 * d1)
    masks, naive_masks = gt_plus_pseudo_masks()  # the pseudo class comes from old_outputs
    want_gpd = naive_gpd(
        to_lists(out["dense_embedding"]), to_lists(old["dense_embedding"]),
        to_lists(out["global_embedding"]), to_lists(old["global_embedding"]),
        to_lists(out["text"]), naive_masks,
    )  # fmt: skip
    assert losses["loss_gpd"].item() == pytest.approx(0.7 * want_gpd, rel=1e-5)
    torch.testing.assert_close(
        losses["loss_qd"], 0.3 * query_distillation(out["queries"], old["queries"])
    )
    total = sum(v.item() for k, v in losses.items() if k != "total")
    assert losses["total"].item() == pytest.approx(total, rel=1e-6)
    # without pseudo-labels GPD uses the GT masks only
    no_pseudo = CISSCriterion(w, use_pseudolabels=False)(out, LABELS, num_old=3, old_outputs=old)
    gt_only = gpd_loss(
        out["dense_embedding"], old["dense_embedding"], out["global_embedding"],
        old["global_embedding"], out["text"], targets,
    )  # fmt: skip
    torch.testing.assert_close(no_pseudo["loss_gpd"], 0.7 * gt_only)
    assert no_pseudo["loss_gpd"].item() != pytest.approx(losses["loss_gpd"].item())
    # gradients: old CACP columns untouched by CE; no gradient into the old model's outputs
    losses["total"].backward()
    assert out["pred_logits"].grad[:, :3].abs().sum() == 0
    assert out["queries"].grad[:, :, 3:].abs().sum() == 0  # QD only on old queries, nothing else
    assert out["dense_embedding"].grad.abs().sum() > 0


def test_criterion_step0_joint_finetune_and_void_switch():
    out = student_outputs(7)
    gen = torch.Generator().manual_seed(8)
    ref_g = F.normalize(torch.randn(2, 3, generator=gen), dim=1).requires_grad_()
    ref_d = F.normalize(torch.randn(2, 3, 2, 2, generator=gen), dim=1).requires_grad_()
    crit = CISSCriterion(SPEC_WEIGHTS)
    step0 = crit(out, LABELS, num_old=0, ref_global=ref_g, ref_dense=ref_d)
    assert "loss_qd" not in step0 and "loss_gpd" in step0
    targets = targets_from_labels(LABELS, 5)
    want = gpd_loss(
        out["dense_embedding"], ref_d, out["global_embedding"], ref_g, out["text"], targets
    )
    torch.testing.assert_close(step0["loss_gpd"], 1.0 * want)
    step0["total"].backward()
    assert ref_g.grad is None and ref_d.grad is None
    assert out["pred_logits"].grad[:, :3].abs().sum() > 0  # step 0: every column counts
    # finetune preset: no GPD, no QD
    ft = CISSCriterion(SPEC_WEIGHTS, use_gpd=False, use_qd=False)(
        student_outputs(7), LABELS, num_old=3
    )
    assert set(ft) == {
        "loss_ce", "loss_mask", "loss_dice", "loss_mask_0", "loss_dice_0", "loss_mask_1",
        "loss_dice_1", "total",
    }  # fmt: skip
    # ignore_void switch changes the mask terms only
    iv = CISSCriterion(SPEC_WEIGHTS, ignore_void_in_masks=True)(
        student_outputs(7), LABELS, num_old=0, ref_global=ref_g, ref_dense=ref_d
    )
    f, _ = mask_losses(student_outputs(7)["pred_masks"], targets, 3.0, (4, 4), valid=LABELS != 255)
    torch.testing.assert_close(iv["loss_mask"], 50.0 * f)
    torch.testing.assert_close(iv["loss_ce"], step0["loss_ce"])
    with pytest.raises(ValueError, match="together"):
        crit(out, LABELS, num_old=0, ref_global=ref_g)
    with pytest.raises(ValueError, match="num_old=2"):
        crit(out, LABELS, num_old=2, old_outputs=old_outputs_fixture(gen))


def test_criterion_float32_under_autocast_with_bf16_inputs():
    out32 = student_outputs(9, requires_grad=False)
    out16 = {
        k: ([{"pred_masks": a["pred_masks"].bfloat16()} for a in v] if k == "aux_outputs"
            else v.bfloat16())
        for k, v in out32.items()
    }  # fmt: skip
    up = {
        k: ([{"pred_masks": a["pred_masks"].float()} for a in v] if k == "aux_outputs"
            else v.float())
        for k, v in out16.items()
    }  # fmt: skip
    old = old_outputs_fixture(torch.Generator().manual_seed(10))
    crit = CISSCriterion(SPEC_WEIGHTS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = crit(out16, LABELS, num_old=3, old_outputs=old)
    want = crit(up, LABELS, num_old=3, old_outputs=old)
    for k in want:
        assert got[k].dtype == torch.float32, k
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)


def test_criterion_batch_without_any_gt_mask():
    out = student_outputs(11)
    labels = torch.zeros(2, 4, 4, dtype=torch.long)
    labels[1, 0] = 255
    gen = torch.Generator().manual_seed(12)
    ref_g = torch.randn(2, 3, generator=gen)
    ref_d = torch.randn(2, 3, 2, 2, generator=gen)
    losses = CISSCriterion(SPEC_WEIGHTS)(out, labels, num_old=0, ref_global=ref_g, ref_dense=ref_d)
    assert losses["loss_mask"].item() == 0.0 and losses["loss_dice_1"].item() == 0.0
    assert losses["loss_gpd"].item() == 0.0  # no prototype: GPD is 0, KL included (authors)
    want_ce = 5.0 * naive_cacp(to_lists(out["pred_logits"]), [[False] * 5] * 2, 0)
    assert losses["loss_ce"].item() == pytest.approx(want_ce, rel=1e-6)
    losses["total"].backward()
    assert out["pred_masks"].grad is None or out["pred_masks"].grad.abs().sum() == 0
