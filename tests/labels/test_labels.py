"""The iDLG label rule and its batch version on random victims (real gradients, no mocks)."""
import pytest
import torch

from lightning_gi.labels import IDLGLabels, SharedLabels, classifier_layer_index, idlg_label, negative_row_labels
from lightning_gi.observation import ObservationError, capture_observation
from lightning_gi.victim import LeNet, torchvision_classifier
from lightning_gi.victim.data import BundledPhotographs, select_batch


@pytest.mark.parametrize("num_classes", [10, 100])
def test_idlg_rule_recovers_label_on_random_lenets(num_classes):
    photos = BundledPhotographs(image_size=32, crops_per_photo=2)
    gen = torch.Generator().manual_seed(num_classes)
    for trial in range(15):
        torch.manual_seed(trial)
        model = LeNet(num_classes=num_classes)
        image = photos[trial % len(photos)][0].unsqueeze(0)
        label = torch.randint(num_classes, (1,), generator=gen)
        obs = capture_observation(model, image, label)
        assert IDLGLabels()(obs, model).tolist() == label.tolist()


def test_batch_rule_recovers_distinct_labels_on_relu_resnet():
    torch.manual_seed(0)
    model = torchvision_classifier("resnet18", num_classes=100).eval()
    photos = BundledPhotographs(image_size=32, crops_per_photo=2)
    images, _, _ = select_batch(photos, 4, seed=1, label_mode="random")
    labels = torch.tensor([3, 17, 42, 99])
    obs = capture_observation(model, images, labels)
    assert IDLGLabels()(obs, model).tolist() == sorted(labels.tolist())
    assert IDLGLabels(source="bias")(obs, model).tolist() == sorted(labels.tolist())


def test_rule_on_a_hand_made_gradient():
    w = torch.ones(5, 3)
    w[2] = -0.5
    assert idlg_label(w) == 2
    w[4] = -2.0
    assert negative_row_labels(w, 2).tolist() == [2, 4]
    with pytest.raises(ObservationError, match="batch_size <= num_classes"):
        negative_row_labels(w, 6)


def test_classifier_layer_found_without_a_model():
    torch.manual_seed(0)
    model = LeNet(num_classes=10, image_size=16)
    obs = capture_observation(model, torch.rand(1, 3, 16, 16), torch.tensor([1]))
    assert classifier_layer_index(obs) == classifier_layer_index(obs, model) == len(obs.gradients) - 2


def test_shared_labels_need_labels_in_the_observation():
    torch.manual_seed(0)
    model = LeNet(num_classes=10, image_size=16)
    x, y = torch.rand(2, 3, 16, 16), torch.tensor([4, 4])
    assert SharedLabels()(capture_observation(model, x, y, share_labels=True), model).tolist() == [4, 4]
    with pytest.raises(ObservationError, match="no 'labels'"):
        SharedLabels()(capture_observation(model, x, y), model)
