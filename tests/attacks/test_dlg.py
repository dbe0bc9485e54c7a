"""DLG and iDLG end to end through the Trainer, and equality with a plain PyTorch loop of the same math."""
import pytest
import pytorch_lightning as pl
import torch

from lightning_gi.attacks import DLG, IDLG
from lightning_gi.victim import LeNet, TensorBatchVictim
from lightning_gi.victim.data import BundledPhotographs
from factories import plain_idlg_lbfgs


def _victim(seed=0, image_size=16, index=3):
    torch.manual_seed(seed)
    model = LeNet(num_classes=10, image_size=image_size)
    image = BundledPhotographs(image_size=image_size, crops_per_photo=1)[index][0].unsqueeze(0)
    return model, image, torch.tensor([6])


def test_idlg_recovers_16px_image(lean_trainer_kwargs):
    model, image, label = _victim()
    attack = IDLG(seed=0)
    pl.Trainer(max_steps=40, **lean_trainer_kwargs).fit(attack, TensorBatchVictim(model, image, label))
    rec = attack.reconstruction()
    assert rec["labels"].tolist() == [6]
    assert float(((rec["images"] - image) ** 2).mean()) < 1e-4
    assert rec["matching_distance"] < 1e-5


def test_dlg_recovers_label_and_image(lean_trainer_kwargs):
    model, image, label = _victim(seed=1)
    attack = DLG(seed=0)
    pl.Trainer(max_steps=60, **lean_trainer_kwargs).fit(attack, TensorBatchVictim(model, image, label))
    rec = attack.reconstruction()
    assert rec["labels"].tolist() == [6]
    assert float(((rec["images"] - image) ** 2).mean()) < 1e-3


def test_attack_equals_plain_pytorch_lbfgs(lean_trainer_kwargs):
    """Same init, same math: the Trainer-driven iDLG iterate equals a hand-written L-BFGS loop."""
    model, image, label = _victim(seed=2)
    attack = IDLG(seed=5)
    pl.Trainer(max_steps=5, **lean_trainer_kwargs).fit(attack, TensorBatchVictim(model, image, label))

    dummy = plain_idlg_lbfgs(model, image, label, seed=5, steps=5)
    torch.testing.assert_close(attack.dummy_images.detach(), dummy.detach(), rtol=0, atol=0)


def test_best_iterate_not_last(lean_trainer_kwargs):
    """A diverging optimiser (huge Adam lr) ends worse than it was: the saved iterate is the best one."""
    model, image, label = _victim(seed=0)
    attack = IDLG(seed=0, optimizer=lambda p: torch.optim.Adam(p, lr=5.0))
    pl.Trainer(max_steps=30, **lean_trainer_kwargs).fit(attack, TensorBatchVictim(model, image, label))
    images, targets = attack.dummy_batch()
    final = float(attack.matching_distance([g.detach() for g in attack.victim_gradients(images, targets)]))
    assert float(attack.best_loss) <= final
    # the stored best images reproduce the stored best loss
    grads = attack.victim_gradients(attack.best_images, targets)
    assert float(attack.matching_distance(grads)) == pytest.approx(float(attack.best_loss), rel=1e-5)


def test_victim_is_not_part_of_the_attack(lean_trainer_kwargs):
    model, image, label = _victim()
    before = [p.detach().clone() for p in model.parameters()]
    attack = IDLG()
    pl.Trainer(max_steps=3, **lean_trainer_kwargs).fit(attack, TensorBatchVictim(model, image, label))
    assert [n for n, _ in attack.named_parameters()] == ["dummy_images"]
    assert not any(k.startswith("victim") for k in attack.state_dict())
    for b, p in zip(before, model.parameters()):
        assert torch.equal(b, p) and p.grad is None


def test_label_out_of_range_is_rejected():
    model, image, _ = _victim()
    with pytest.raises(ValueError, match=r"outside \[0, 10\)"):
        TensorBatchVictim(model, image, torch.tensor([12])).setup()


def test_image_size_not_matching_model_is_rejected():
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"does not accept inputs of shape \(3, 32, 32\)"):
        TensorBatchVictim(LeNet(num_classes=10, image_size=16), torch.rand(1, 3, 32, 32), torch.tensor([1]))


def test_saved_reconstruction_includes_the_final_iterate(tmp_path, lean_trainer_kwargs):
    from lightning_gi.callbacks import ReconstructionReport

    model, image, label = _victim(seed=0)
    attack = IDLG(seed=0)
    trainer = pl.Trainer(max_steps=8, callbacks=[ReconstructionReport(save_every_n_steps=0)], **lean_trainer_kwargs)
    trainer.fit(attack, TensorBatchVictim(model, image, label))
    saved = torch.load(tmp_path / "reconstruction.pt", weights_only=True)
    assert saved["matching_distance"] == attack.reconstruction()["matching_distance"]
    images, targets = attack.dummy_batch()
    final = float(attack.matching_distance([g.detach() for g in attack.victim_gradients(images, targets)]))
    assert saved["matching_distance"] <= final
