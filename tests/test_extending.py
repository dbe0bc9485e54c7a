"""docs/ARCHITECTURE.md "How to add ...": a new attack and a new label strategy are each ONE file outside the
package, named in a config, run by `lightning-gi fit` as they are. (A new threat model is one change in
lightning_gi/client.py: tests/test_client.py and tests/victim/test_threat_models.py cover that path.)"""
import json
import sys
import textwrap
from pathlib import Path

import yaml

from factories import run_cli

ROOT = Path(__file__).resolve().parents[1]

EXTENSION = textwrap.dedent('''
    """A user's extension, one file: an attack whose unknowns are logits (images = sigmoid, so always in [0, 1])
    and a label strategy reading the label of a single image off the last layer's bias gradient."""
    import torch
    from torch import nn

    from lightning_gi.attacks.base import GradientInversionAttack
    from lightning_gi.labels import LabelStrategy


    class SigmoidImages(GradientInversionAttack):
        def create_unknowns(self, generator):
            self.image_logits = nn.Parameter(torch.randn(self.batch_size, *self.inputs.image_shape, generator=generator))

        def restart_images(self):
            return self.inputs.to_input_space(torch.sigmoid(self.image_logits)).unsqueeze(0)


    class BiasArgmin(LabelStrategy):
        def recover(self, observation, model):
            return observation.gradients[-1].argmin().reshape(1)
''')


def test_an_attack_and_a_label_strategy_from_one_user_file_run_through_the_cli(tmp_path, monkeypatch):
    (tmp_path / "my_extension.py").write_text(EXTENSION)
    monkeypatch.syspath_prepend(str(tmp_path))
    config = yaml.safe_load((ROOT / "configs" / "idlg_lenet.yaml").read_text())
    config["model"] = {
        "class_path": "my_extension.SigmoidImages",
        "init_args": {"label_strategy": {"class_path": "my_extension.BiasArgmin"}},  # L-BFGS: the core's default
    }
    config["trainer"]["max_steps"] = 40
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "runs")
    path = tmp_path / "my_attack.yaml"
    path.write_text(yaml.safe_dump(config))
    try:
        code, out, err = run_cli(["fit", "--config", str(path), "--trainer.enable_progress_bar=false"])
    finally:
        sys.modules.pop("my_extension", None)
    assert code == 0, err
    metrics = json.loads(next((tmp_path / "runs").glob("*/version_0/metrics.json")).read_text())
    assert metrics["label_accuracy"] == 1.0  # the strategy's label is the true one
    assert metrics["psnr"] > 25.0, metrics  # the new parametrisation inverts the LeNet gradient
