"""Tokenizer training: the LightningModule learns, the GAN step updates both models, LPIPS loads from one local file."""

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import tiny_vq
from torch.utils.data import DataLoader, TensorDataset

from scalegen.tokenizers.losses import PatchDiscriminator, Perceptual, build_lpips_weights, hinge_d_loss
from scalegen.tokenizers.train import TokenizerModule, _frozen, psnr

pytestmark = [pytest.mark.threads(1),
              pytest.mark.filterwarnings("ignore:.*does not have many workers.*", "ignore:.*GPU available but not used.*",
                                         "ignore:.*no `val_dataloader`.*")]


def loader(n: int = 32, batch_size: int = 8, size: int = 8, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    # smooth images in [-1, 1]: upsampled noise at half the size, something the latent can learn
    noise = torch.rand(n, 3, size // 2, size // 2, generator=g) * 2 - 1
    images = F.interpolate(noise, size=size, mode="bilinear", align_corners=False)
    return DataLoader(TensorDataset(images, torch.zeros(n, dtype=torch.long)), batch_size=batch_size)


def trainer(tmp_path, max_steps: int, **kw) -> L.Trainer:
    return L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, **kw)


@torch.no_grad()
def eval_mse(tokenizer: torch.nn.Module, data: DataLoader) -> float:
    tokenizer.eval()
    mse = sum(F.mse_loss(tokenizer(img)[0].clamp(-1, 1), img).item() for img, _ in data) / len(data)
    tokenizer.train()
    return mse


def test_vq_tokenizer_learns_and_logs(tmp_path):
    torch.manual_seed(0)
    data = loader()
    module = TokenizerModule(tiny_vq(), lr=2e-3, warmup_steps=5)
    before = eval_mse(module.tokenizer, data)
    fit = trainer(tmp_path, max_steps=30, limit_val_batches=1, check_val_every_n_epoch=4)
    fit.fit(module, data, val_dataloaders=data)
    after = eval_mse(module.tokenizer, data)
    assert after < 0.6 * before, (before, after)  # 0.28 -> 0.15

    metrics = fit.callback_metrics
    for key in ("train/loss", "train/recon", "train/aux", "train/psnr", "val/recon", "val/psnr"):
        assert key in metrics and torch.isfinite(metrics[key]), key
    assert {f"train/usage_s{k}" for k in range(3)} <= set(metrics)
    assert all(0 <= metrics[f"train/usage_s{k}"] <= 100 for k in range(3))
    assert not any(k in metrics for k in ("train/perceptual", "train/g_adv", "train/d_loss"))
    assert (tmp_path / "recon_epoch3.png").is_file()  # epochs 0-3 at 4 batches each; validation after epoch 3


def test_discriminator_and_tokenizer_both_step(tmp_path):
    torch.manual_seed(0)
    module = TokenizerModule(tiny_vq(), lr=1e-3, disc_weight=0.5, disc_start=1, disc_ch=8, disc_layers=1)
    disc_before = [p.detach().clone() for p in module.discriminator.parameters()]
    tok_before = [p.detach().clone() for p in module.tokenizer.parameters()]
    fit = trainer(tmp_path, max_steps=3)
    fit.fit(module, loader(n=24))
    assert fit.global_step == 3  # one optimizer step per batch, GAN on or off
    # every weight moves (the last bias may not: the hinge gradient on it is 0 while all logits lie in (-1, 1))
    disc_after = module.discriminator.named_parameters()
    assert all(not torch.equal(a, b) for a, (name, b) in zip(disc_before, disc_after) if name.endswith("weight"))
    assert any(not torch.equal(a, b) for a, b in zip(tok_before, module.tokenizer.parameters()))
    metrics = fit.callback_metrics
    for key in ("train/g_adv", "train/d_loss", "train/d_weight"):
        assert key in metrics and torch.isfinite(metrics[key]), key
    assert metrics["train/d_weight"] > 0


def test_discriminator_is_frozen_for_the_generator_term():
    """One backward: the GAN term reaches the tokenizer only, the hinge loss reaches the discriminator only."""
    torch.manual_seed(0)
    module = TokenizerModule(tiny_vq(), disc_weight=1.0, disc_ch=8, disc_layers=1, adaptive_disc_weight=False)
    img = next(iter(loader()))[0]
    recon = module.tokenizer(img)[0]
    with _frozen(module.discriminator):
        g_adv = -module.discriminator(recon).mean()
    g_adv.backward()
    assert all(p.grad is None for p in module.discriminator.parameters())
    assert module.tokenizer.decoder.conv_out.weight.grad is not None
    module.zero_grad()
    hinge_d_loss(module.discriminator(img), module.discriminator(recon.detach())).backward()
    assert all(p.grad is not None for p in module.discriminator.parameters())
    assert all(p.grad is None for p in module.tokenizer.parameters())


def test_patch_discriminator_shapes():
    assert PatchDiscriminator(3, ch=8, n_layers=3)(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)
    assert PatchDiscriminator(3, ch=8, n_layers=1)(torch.randn(2, 3, 8, 8)).shape == (2, 1, 2, 2)


def test_psnr():
    img = torch.rand(2, 3, 4, 4) * 1.6 - 0.8
    assert psnr(img + 0.2, img).item() == pytest.approx(20.0, abs=1e-3)  # 0.1 on [0, 1] = 20 dB


@pytest.mark.parametrize("path", [None, "/nonexistent/lpips_vgg16.safetensors"])
def test_perceptual_without_weights_fails_at_construction(path):
    with pytest.raises(FileNotFoundError, match="python -m scalegen.tokenizers.losses") as err:
        TokenizerModule(tiny_vq(), perceptual_weight=1.0, perceptual_weights=path)
    assert repr(path) in str(err.value)


@pytest.fixture(scope="module")
def lpips_file(tmp_path_factory):
    """The weights file built the documented way, from a (random) torchvision vgg16 and (random) LPIPS lin layers."""
    tmp = tmp_path_factory.mktemp("lpips")
    torch.manual_seed(0)
    vgg = torchvision.models.vgg16(weights=None)
    torch.save({k: v for k, v in vgg.state_dict().items() if k.startswith("features.")}, tmp / "vgg16.pth")
    lin = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(lin, tmp / "vgg.pth")  # the official lpips layout: Sequential(Dropout, Conv1x1)
    out = tmp / "lpips_vgg16.safetensors"
    build_lpips_weights(str(tmp / "vgg.pth"), str(out), vgg_path=str(tmp / "vgg16.pth"))
    return out, vgg


def test_perceptual_from_built_file(lpips_file):
    path, vgg = lpips_file
    lpips = Perceptual(str(path))
    assert torch.equal(lpips.features[28].weight, vgg.features[28].weight)
    assert not any(p.requires_grad for p in lpips.parameters())
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(lpips(x, x), torch.zeros(2))
    d = lpips(x, y)
    assert d.shape == (2,) and (d > 0).all()


def test_perceptual_in_training_and_out_of_checkpoints(lpips_file, tmp_path):
    path, _ = lpips_file
    torch.manual_seed(0)
    module = TokenizerModule(tiny_vq(scales=(1, 2, 4, 8)), perceptual_weight=0.5, perceptual_weights=str(path))
    fit = trainer(tmp_path, max_steps=1)
    fit.fit(module, loader(n=8, size=16))  # VGG's four poolings need at least 16x16
    assert torch.isfinite(fit.callback_metrics["train/perceptual"])
    fit.save_checkpoint(tmp_path / "last.ckpt")
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]
    assert not any(k.startswith("perceptual.") for k in state) and any(k.startswith("tokenizer.") for k in state)
    # strict loading still works: the frozen LPIPS weights come back from the module's own file
    TokenizerModule.load_from_checkpoint(tmp_path / "last.ckpt", tokenizer=tiny_vq(scales=(1, 2, 4, 8)))
