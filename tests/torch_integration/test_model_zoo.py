"""The models people train, end to end: torchvision, timm, Hugging Face transformers and torch.nn ones.

Tiny configurations, random init, no downloads. For every model: the layers converted (stated per case in
``expected``), OIALR's switch and two rank updates with the loss going down, a checkpoint round trip
equal to the bit, DLDR recording and subspace steps, CMD warm-up and swapped evaluation, and
``low_rank_model`` with each init.

The model packages are those of pyproject.toml's ``models`` group (``nox -s "tests(torch)"`` installs
them). When the torch backend is tested, a package that cannot be imported fails every test that needs
it (with the import error), never a skip; see ``_model_packages.py`` for the torchvision workaround.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

_asked = [b.strip() for b in os.environ.get("LOWRANK_TEST_BACKENDS", "").split(",") if b.strip()]
if _asked and "torch" not in _asked:
    pytest.skip("LOWRANK_TEST_BACKENDS does not include torch", allow_module_level=True)

torch = pytest.importorskip("torch")
nn = torch.nn

from _model_packages import import_model_packages  # noqa: E402

from lowrank_core.init import INIT_METHODS  # noqa: E402
from lowrank_torch.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from lowrank_torch.cmd import CMDConfig, CMDTracker  # noqa: E402
from lowrank_torch.convert import ConversionError, eligible_names, to_low_rank  # noqa: E402
from lowrank_torch.dldr import SnapshotRecorder, SubspaceSGD, flatten  # noqa: E402
from lowrank_torch.init import low_rank_model  # noqa: E402
from lowrank_torch.layers import LowRankLayer, LowRankTransformersConv1D  # noqa: E402
from lowrank_torch.oialr import OIALR, OIALRConfig  # noqa: E402

PACKAGES, IMPORT_ERRORS = import_model_packages()


def need(package: str) -> Any:
    """The imported package, or a test failure (not a skip) saying why it cannot be imported."""
    if package not in PACKAGES:
        pytest.fail(
            f"model package {package!r} cannot be imported: {IMPORT_ERRORS.get(package)}; install "
            "pyproject.toml's `models` dependency group (nox -s 'tests(torch)' does)",
            pytrace=False,
        )
    return PACKAGES[package]


def test_model_packages_import():
    for name in ("torchvision", "timm", "transformers"):
        need(name)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------------------------------
# the models
# --------------------------------------------------------------------------------------------------
@dataclass
class Case:
    """A model, its data and loss, and the layers its default conversion must pick."""

    build: Callable[[], Any]  # a fresh model (seeded inside)
    batch: Callable[[], dict[str, Any]]  # a fixed batch
    loss: Callable[[Any, dict[str, Any]], Any]
    expected: list[str]  # eligible_names with the case's options, in order
    options: dict[str, Any] = field(
        default_factory=dict
    )  # eligibility options (OIALRConfig fields)
    tied: tuple[str, str] | None = None  # (embedding, head) parameter names sharing one tensor
    lr: float = 3e-3


def _images(channels=3, size=32, n=4, classes=4):
    g = torch.Generator().manual_seed(1)
    return lambda: {
        "x": torch.randn(n, channels, size, size, generator=g),
        "y": torch.randint(0, classes, (n,), generator=g),
    }


def _tokens(vocab=64, n=2, length=12, labels=None):
    def make():
        g = torch.Generator().manual_seed(2)
        out = {"ids": torch.randint(0, vocab, (n, length), generator=g)}
        if labels is not None:
            out["y"] = torch.randint(0, labels, (n,), generator=g)
        return out

    return make


def _ce(model, b):
    return nn.functional.cross_entropy(model(b["x"]), b["y"])


def _lm(model, b):
    return model(input_ids=b["ids"], labels=b["ids"]).loss


def _seeded(fn):
    def build():
        torch.manual_seed(0)
        return fn()

    return build


def resnet18():
    """ResNet-18's topology from torchvision's own ``ResNet`` and ``BasicBlock``, at 1/8 of the width.

    (Full width, the switch alone takes ~15 s on one CPU core: twenty full-rank SVDs up to 512 x 4608.
    :func:`test_full_size_models_pick_the_same_layers` checks the real ``resnet18()`` picks the same.)
    """
    models = need("torchvision").models

    class NarrowResNet18(models.ResNet):  # type: ignore[misc,name-defined]
        def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
            if planes == 64:
                self.inplanes = 8
            return super()._make_layer(block, planes // 8, blocks, stride, dilate)

    model = NarrowResNet18(models.resnet.BasicBlock, [2, 2, 2, 2], num_classes=4)
    model.conv1 = nn.Conv2d(3, 8, 7, stride=2, padding=3, bias=False)
    model.bn1 = nn.BatchNorm2d(8)
    model.fc = nn.Linear(64, 4)
    return model


def mobilenet_v3_small(width_mult=0.25):
    return need("torchvision").models.mobilenet_v3_small(num_classes=4, width_mult=width_mult)


def vit():
    tv = need("torchvision")
    return tv.models.VisionTransformer(
        image_size=32,
        patch_size=8,
        num_layers=2,
        num_heads=2,
        hidden_dim=32,
        mlp_dim=64,
        num_classes=4,
    )


def convnext():
    conv = need("torchvision").models.convnext
    setting = [conv.CNBlockConfig(16, 32, 1), conv.CNBlockConfig(32, None, 1)]
    return conv.ConvNeXt(setting, num_classes=4)


def timm_vit():
    return need("timm").create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        num_classes=4,
    )


def gpt2():
    t = need("transformers")
    cfg = t.GPT2Config(
        vocab_size=64,
        n_positions=16,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return t.GPT2LMHeadModel(cfg)


def bert():
    t = need("transformers")
    cfg = t.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=3,
    )
    return t.BertForSequenceClassification(cfg)


def llama(tied):
    t = need("transformers")
    cfg = t.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16,
        tie_word_embeddings=tied,
    )
    return t.LlamaForCausalLM(cfg)


def t5():
    t = need("transformers")
    cfg = t.T5Config(
        vocab_size=64,
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=2,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
    )
    return t.T5ForConditionalGeneration(cfg)


class Encoder(nn.Module):
    """torch.nn's TransformerEncoder between an input projection and a classification head."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 32)
        layer = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        return self.head(self.encoder(self.inp(x)).mean(1))


class Tagger(nn.Module):
    """An LSTM language model: embedding, two LSTM layers, a projection, the head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(64, 16)
        self.lstm = nn.LSTM(16, 32, num_layers=2, batch_first=True)
        self.proj = nn.Linear(32, 32)
        self.head = nn.Linear(32, 64)

    def forward(self, ids):
        return self.head(torch.tanh(self.proj(self.lstm(self.embed(ids))[0])))


def _seq_batch():
    g = torch.Generator().manual_seed(3)
    return {"x": torch.randn(4, 6, 8, generator=g), "y": torch.randint(0, 4, (4,), generator=g)}


def _tagger_loss(model, b):
    logits = model(b["ids"][:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, 64), b["ids"][:, 1:].reshape(-1))


def _blocks(prefix, count, parts):
    return [f"{prefix}.{i}.{p}" for i in range(count) for p in parts]


_RESNET = ["conv1"]
for _stage in range(1, 5):
    for _block in range(2):
        _RESNET += [f"layer{_stage}.{_block}.conv1", f"layer{_stage}.{_block}.conv2"]
        if _stage > 1 and _block == 0:
            _RESNET.append(f"layer{_stage}.0.downsample.0")

# MobileNetV3-small: every convolution except the 9 depthwise ones (rank one per channel), the
# squeeze-excitation 1x1 convolutions included; classifier.0 (576 -> 1024); classifier.3 is the head.
_MOBILENET = (
    ["features.0.0", "features.1.block.1.fc1", "features.1.block.1.fc2", "features.1.block.2.0"]
    + [
        "features.2.block.0.0",
        "features.2.block.2.0",
        "features.3.block.0.0",
        "features.3.block.2.0",
    ]
    + [
        name
        for i in range(4, 12)
        for name in (
            f"features.{i}.block.0.0",
            f"features.{i}.block.2.fc1",
            f"features.{i}.block.2.fc2",
            f"features.{i}.block.3.0",
        )
    ]
    + ["features.12.0", "classifier.0"]
)

_LLAMA = _blocks(
    "model.layers",
    2,
    [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ],
)

CASES: dict[str, Case] = {
    # torchvision ResNet-18: all 20 convolutions (conv1, 16 block convs, 3 downsample 1x1); fc is the head
    "resnet18": Case(_seeded(resnet18), _images(), _ce, _RESNET),
    "mobilenet_v3_small": Case(_seeded(mobilenet_v3_small), _images(), _ce, _MOBILENET),
    # torchvision ViT: patch conv, each block's attention (in_proj + out_proj) and MLP; heads.head kept
    "vit": Case(
        _seeded(vit),
        _images(),
        _ce,
        ["conv_proj"]
        + [
            f"encoder.layers.encoder_layer_{i}.{p}"
            for i in range(2)
            for p in ("self_attention", "mlp.0", "mlp.3")
        ],
    ),
    # ConvNeXt (two stages of one block): stem, both blocks' Linears, the downsampling conv; the 7x7
    # depthwise convolutions are rank one per channel and stay dense; classifier.2 is the head
    "convnext": Case(
        _seeded(convnext),
        _images(),
        _ce,
        [
            "features.0.0",
            "features.1.0.block.3",
            "features.1.0.block.5",
            "features.2.1",
            "features.3.0.block.3",
            "features.3.0.block.5",
        ],
    ),
    # timm ViT: patch embedding conv, qkv / proj / fc1 / fc2 per block; head kept
    "timm_vit": Case(
        _seeded(timm_vit),
        _images(),
        _ce,
        [
            "patch_embed.proj",
            *_blocks("blocks", 2, ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]),
        ],
    ),
    # GPT-2: the 8 Conv1D projections (as LowRankTransformersConv1D); lm_head is tied to wte and stays dense even
    # with keep_last=False; wte keeps training
    "gpt2": Case(
        _seeded(gpt2),
        _tokens(),
        _lm,
        _blocks("transformer.h", 2, ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]),
        options={"keep_last": False},
        tied=("transformer.wte.weight", "lm_head.weight"),
    ),
    # BERT: query/key/value/attention output/intermediate/output per layer, the pooler; classifier kept
    "bert": Case(
        _seeded(bert),
        _tokens(labels=3),
        lambda m, b: m(input_ids=b["ids"], labels=b["y"]).loss,
        [
            *_blocks(
                "bert.encoder.layer",
                2,
                [
                    "attention.self.query",
                    "attention.self.key",
                    "attention.self.value",
                    "attention.output.dense",
                    "intermediate.dense",
                    "output.dense",
                ],
            ),
            "bert.pooler.dense",
        ],
    ),
    # Llama, tied: the 7 projections per layer; lm_head shares embed_tokens' weight and stays dense
    "llama_tied": Case(
        _seeded(lambda: llama(True)),
        _tokens(),
        _lm,
        _LLAMA,
        options={"keep_last": False},
        tied=("model.embed_tokens.weight", "lm_head.weight"),
    ),
    # Llama, untied: the same, plus lm_head (keep_last=False)
    "llama_untied": Case(
        _seeded(lambda: llama(False)), _tokens(), _lm, [*_LLAMA, "lm_head"], {"keep_last": False}
    ),
    # T5 (encoder-decoder): q/k/v/o of every attention and both feed-forward Linears; lm_head kept
    "t5": Case(
        _seeded(t5),
        _tokens(),
        _lm,
        [
            *[f"encoder.block.0.layer.0.SelfAttention.{p}" for p in "qkvo"],
            "encoder.block.0.layer.1.DenseReluDense.wi",
            "encoder.block.0.layer.1.DenseReluDense.wo",
            *[f"decoder.block.0.layer.0.SelfAttention.{p}" for p in "qkvo"],
            *[f"decoder.block.0.layer.1.EncDecAttention.{p}" for p in "qkvo"],
            "decoder.block.0.layer.2.DenseReluDense.wi",
            "decoder.block.0.layer.2.DenseReluDense.wo",
        ],
    ),
    # nn.TransformerEncoder: input projection, per layer the attention, linear1, linear2; head kept
    "transformer_encoder": Case(
        _seeded(Encoder),
        _seq_batch,
        _ce,
        ["inp", *_blocks("encoder.layers", 2, ["self_attn", "linear1", "linear2"])],
    ),
    # LSTM model: the LSTM stays dense by rule, proj is converted, head kept
    "lstm": Case(_seeded(Tagger), _tokens(), _tagger_loss, ["proj"]),
}
IDS = list(CASES)


def _in_optimizer(model, opt):
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    return [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in held]


def _train(model, opt, case, b, steps, ctrl=None):
    losses = []
    for _ in range(steps):
        loss = case.loss(model, b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if ctrl is not None:
            ctrl.step()
        losses.append(float(loss.detach()))
    return losses


# --------------------------------------------------------------------------------------------------
# the tests
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", IDS)
def test_conversion_picks_the_expected_layers_and_is_exact(name):
    case = CASES[name]
    model = case.build()
    assert eligible_names(model, **case.options) == case.expected
    model.eval()
    ref = copy.deepcopy(model)
    b = case.batch()
    result = to_low_rank(model, **case.options)
    assert all(isinstance(layer, LowRankLayer) for layer in result.values())
    if name == "gpt2":
        assert all(isinstance(result[n], LowRankTransformersConv1D) for n in case.expected)
    if case.tied is not None:
        emb, head = case.tied
        params = dict(model.named_parameters(remove_duplicate=False))
        assert params[emb] is params[head]  # the tie is kept
    with torch.no_grad():
        torch.testing.assert_close(case.loss(model, b), case.loss(ref, b), rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("name", IDS)
def test_oialr_switch_rank_updates_and_checkpoint_round_trip(name, tmp_path):
    case = CASES[name]
    model = case.build()
    b = case.batch()
    opt = torch.optim.AdamW(model.parameters(), lr=case.lr)
    config = OIALRConfig(switch_step=2, update_every=2, **case.options)
    ctrl = OIALR(model, opt, config)
    assert ctrl.eligible == case.expected
    tied_before = None
    losses = _train(model, opt, case, b, 2, ctrl)  # the switch happens after the second step
    assert sorted(ctrl.switched) == sorted(case.expected)
    assert _in_optimizer(model, opt) == []  # every trainable parameter is still trained
    if case.tied is not None:
        params = dict(model.named_parameters(remove_duplicate=False))
        assert params[case.tied[0]] is params[case.tied[1]]
        tied_before = params[case.tied[0]].detach().clone()
    losses += _train(model, opt, case, b, 4, ctrl)  # rank updates at steps 4 and 6
    assert len([e for e in ctrl.events("rank")]) == 2 * len(ctrl.layers)
    assert losses[-1] < losses[0], losses
    if tied_before is not None:  # the tied embedding kept training after the switch
        moved = (dict(model.named_parameters())[case.tied[0]] - tied_before).abs().max()
        assert float(moved.detach()) > 0

    path = save_checkpoint(tmp_path / "ckpt.pt", model=model, optimizer=opt, oialr=ctrl)
    fresh = case.build()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=case.lr)
    fresh_ctrl = OIALR(fresh, fresh_opt, config)
    load_checkpoint(path, model=fresh, optimizer=fresh_opt, oialr=fresh_ctrl)
    want, got = model.state_dict(), fresh.state_dict()
    assert list(got) == list(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert fresh_ctrl.ranks() == ctrl.ranks()
    # the next step is the same to the bit (same random stream for dropout)
    torch.manual_seed(5)
    _train(model, opt, case, b, 1, ctrl)
    torch.manual_seed(5)
    _train(fresh, fresh_opt, case, b, 1, fresh_ctrl)
    for (k, p), (k2, q) in zip(model.named_parameters(), fresh.named_parameters(), strict=True):
        assert k == k2 and torch.equal(p, q), k


@pytest.mark.parametrize("name", IDS)
def test_dldr_recording_and_subspace_training(name):
    case = CASES[name]
    model = case.build()
    b = case.batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rec = SnapshotRecorder(model)
    rec.record()
    for _ in range(5):
        _train(model, opt, case, b, 1)
        rec.record()
    sub = rec.fit(2)
    assert sub.num_snapshots == 6 and tuple(sub.basis.shape) == (2, rec.store.dim)
    params = [p for p in model.parameters() if p.requires_grad]
    w0 = flatten(params).detach().clone()
    psgd = SubspaceSGD(params, sub, lr=0.02, momentum=0.0)
    before = float(case.loss(model, b).detach())
    losses = _train(model, psgd, case, b, 3)
    after = float(case.loss(model, b).detach())
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
    assert after < before
    delta = flatten(params).detach() - w0
    P = sub.basis
    # the steps stay in the subspace up to the float32 rounding of w = w0 + P^T c (eps |w| / 2 per write)
    atol = 8 * torch.finfo(torch.float32).eps * float(w0.abs().max())
    torch.testing.assert_close(P.T @ (P @ delta), delta, rtol=0, atol=atol)


@pytest.mark.parametrize("name", IDS)
def test_cmd_warmup_and_swapped_evaluation(name):
    case = CASES[name]
    model = case.build()
    b = case.batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    cmd = CMDTracker(model, CMDConfig(warmup_epochs=3, max_modes=2, num_samples=200))
    for _ in range(4):  # one step per "epoch"
        _train(model, opt, case, b, 1)
        cmd.after_epoch()
    assert cmd.fitted
    trained = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad(), cmd.swapped():
        swapped = case.loss(model, b)
        assert torch.isfinite(swapped)
        assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), trained, strict=True))
    for p, q in zip(model.parameters(), trained, strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("init", INIT_METHODS)
@pytest.mark.parametrize("name", IDS)
def test_low_rank_model_each_init(name, init):
    case = CASES[name]
    model = case.build()
    b = case.batch()
    opt = torch.optim.AdamW(model.parameters(), lr=case.lr)
    result = low_rank_model(model, 0.5, init=init, optimizer=opt, seed=0, **case.options)
    parts = {n.rsplit(".parametrizations.", 1)[0].removesuffix(".out_proj") for n in result}
    assert sorted(parts) == sorted(case.expected)
    assert _in_optimizer(model, opt) == []
    if case.tied is not None:
        params = dict(model.named_parameters(remove_duplicate=False))
        assert params[case.tied[0]] is params[case.tied[1]]
    losses = _train(model, opt, case, b, 3)
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
    assert losses[-1] < losses[0], losses


def test_full_size_models_pick_the_same_layers():
    tv = need("torchvision")
    assert eligible_names(tv.models.resnet18(num_classes=4)) == CASES["resnet18"].expected
    torch.manual_seed(0)
    full = mobilenet_v3_small(width_mult=1.0)
    assert eligible_names(full) == CASES["mobilenet_v3_small"].expected


def test_gpt2_tied_head_refused_by_name_and_model_untouched():
    case = CASES["gpt2"]
    model = case.build()
    ref = copy.deepcopy(model)
    with pytest.raises(ConversionError, match=r"'lm_head'.*shared with transformer\.wte\.weight"):
        to_low_rank(model, keep_last=False, names=[*case.expected, "lm_head"])
    for (k, p), (_, q) in zip(model.state_dict().items(), ref.state_dict().items(), strict=True):
        assert torch.equal(p, q), k
    assert not any(isinstance(m, LowRankLayer) for m in model.modules())


def test_gpt2_low_rank_conv1d_back_to_dense():
    model = CASES["gpt2"].build()
    conv = model.transformer.h[0].attn.c_attn
    layer = LowRankTransformersConv1D.from_dense(conv)
    back = layer.to_dense()
    assert type(back) is type(conv) and back.weight.shape == conv.weight.shape
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(back(x), conv(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(layer(x), conv(x), rtol=1e-4, atol=1e-5)
