"""MONAI's MaskedAutoEncoderViT through the adapter: the same output as MONAI's own
forward given the same mask, guided masks that hide the largest errors, and a
compiled training step."""

import pytest
import torch

monai_mae = pytest.importorskip("monai.networks.nets.masked_autoencoder_vit")

from anatomask_fast.integrations.monai_mae import (  # noqa: E402
    MaskedViTAdapter,
    patchify,
    token_errors,
)
from anatomask_fast.masker import AnatoMasker  # noqa: E402


def small_mae():
    torch.manual_seed(0)
    return monai_mae.MaskedAutoEncoderViT(
        in_channels=1,
        img_size=(16, 16, 16),
        patch_size=(4, 4, 4),
        hidden_size=48,
        mlp_dim=64,
        num_layers=2,
        num_heads=4,
        decoder_hidden_size=48,
        decoder_mlp_dim=64,
        decoder_num_layers=1,
        decoder_num_heads=4,
        masking_ratio=0.6,
    ).eval()


def test_adapter_equals_monai_forward_with_the_same_mask(monkeypatch):
    model = small_mae()
    masker = AnatoMasker(num_patches=64, mask_ratio=0.6, total_epochs=2)
    x = torch.randn(2, 1, 16, 16, 16)
    mask = masker.random(2, "cpu")

    def same_mask(tokens, masking_ratio=None):
        batch = torch.arange(tokens.shape[0]).unsqueeze(1)
        hidden = (~mask.active).int()
        return tokens[batch, mask.ids_keep], mask.ids_keep, hidden

    monkeypatch.setattr(model, "_masking", same_mask)
    expected, expected_hidden = model(x)
    pred, hidden = MaskedViTAdapter(model)(x, mask)
    torch.testing.assert_close(pred, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(hidden, expected_hidden)


def test_guided_masks_hide_the_largest_errors():
    model = MaskedViTAdapter(small_mae())
    masker = AnatoMasker(
        num_patches=64, mask_ratio=0.6, total_epochs=2, schedule="constant", value=1.0
    )
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        teacher_mask = masker.random(2, "cpu")
        pred, hidden = model(x, teacher_mask)
        errors = token_errors(pred, patchify(x, (4, 4, 4)), hidden)
    mask = masker.anatomical(errors)
    worst = errors.topk(mask.n_hard, dim=1).indices
    assert mask.n_hard == 38 and (~mask.active.gather(1, worst)).all()


def test_wrong_mask_size_is_named():
    model = MaskedViTAdapter(small_mae())
    mask = AnatoMasker(num_patches=27, mask_ratio=0.6, total_epochs=2).random(1, "cpu")
    with pytest.raises(ValueError, match=r"covers \(1, 27\) patches, the model makes \(1, 64\)"):
        model(torch.randn(1, 1, 16, 16, 16), mask)


def test_compiled_training_step_through_the_fused_token_ops():
    model = MaskedViTAdapter(small_mae()).train()
    masker = AnatoMasker(num_patches=64, mask_ratio=0.6, total_epochs=2)
    x = torch.randn(2, 1, 16, 16, 16)
    mask = masker.random(2, "cpu")

    def loss_fn(x, ids_keep, ids_restore, active):
        m = masker_result(mask, ids_keep, ids_restore, active)
        pred, hidden = model(x, m)
        return token_errors(pred, patchify(x, (4, 4, 4)), hidden).sum() / hidden.sum()

    def masker_result(template, ids_keep, ids_restore, active):
        import dataclasses

        ids_shuffle = torch.cat([ids_keep, template.ids_hidden], dim=1)
        return dataclasses.replace(
            template, ids_shuffle=ids_shuffle, ids_restore=ids_restore, active=active
        )

    eager = loss_fn(x, mask.ids_keep, mask.ids_restore, mask.active)
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    loss = compiled(x, mask.ids_keep, mask.ids_restore, mask.active)
    loss.backward()
    torch.testing.assert_close(loss, eager)
    assert model.model.mask_tokens.grad is not None


def test_example_script_runs(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "pretrain_monai_mae.py"
    result = subprocess.run(
        [sys.executable, str(script), "--steps", "2", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step   2  loss" in result.stdout
