"""The one registry: lookup errors, duplicate names, plugins by module name and entry point."""

import textwrap

import numpy as np
import pytest

from nordfl import registry
from nordfl.tasks.task import make_model


SHIPPED = {
    "algorithm": ("ditto", "fedadagrad", "fedadam", "fedavg", "fedavgm", "fedbn", "fedper", "fedprox", "fedrep", "fedyogi", "scaffold"),
    "aggregator": ("bulyan", "centered_clipping", "krum", "median", "trimmed_mean", "weighted_mean"),
    "server_optimizer": ("fedadagrad", "fedadam", "fedavgm", "fedyogi", "sgd"),
    "model": ("cnn", "logistic_regression", "mlp"),
    "task": ("digits", "heart", "study", "synthetic", "synthetic_iid"),
    "partitioner": ("dirichlet", "feature_shift", "iid", "k_classes", "natural", "quantity_skew"),
    "attack": ("gaussian", "label_flip", "little_is_enough", "scaled", "sign_flip"),
}


def test_every_shipped_component_goes_through_the_registry():
    assert {kind: registry.names(kind) for kind in registry.KINDS} == SHIPPED
    assert registry.lookup("model", "cnn").properties["input"] == "image"
    assert registry.lookup("model", "mlp").properties["input"] == "flat"
    assert {k: v for k, v in registry.lookup("task", "heart").properties.items() if k != "site_data"} == {
        "feature_shape": (13,), "num_classes": 2}
    assert registry.lookup("task", "heart").properties["site_data"].columns[0].name == "id"
    assert registry.lookup("algorithm", "fedadam").properties["server_optimizer"] == "fedadam"
    assert registry.lookup("algorithm", "scaffold").properties["needs"] == ("num_clients",)
    # Every option of a config group declares its schema, and nothing else in NordFL lists them.
    from nordfl.conf.schema import GROUPS, schema_of

    for group, (kind, base) in GROUPS.items():
        for name in SHIPPED[kind]:
            assert issubclass(schema_of(group, name), base)
    assert "mu" in schema_of("algorithm", "fedprox").__dataclass_fields__
    assert "mu" not in schema_of("algorithm", "fedavg").__dataclass_fields__
    assert "alpha" in schema_of("task", "synthetic").__dataclass_fields__
    assert "alpha" not in schema_of("task", "heart").__dataclass_fields__


def test_unknown_names_and_kinds_are_errors_listing_what_exists():
    with pytest.raises(ValueError, match="task.model: unknown name 'resnet'; expected one of cnn, logistic_regression, mlp"):
        registry.lookup("model", "resnet", field="task.model")
    with pytest.raises(ValueError, match="registry: unknown kind 'modle'; expected one of algorithm, aggregator"):
        registry.lookup("modle", "mlp")
    with pytest.raises(ValueError, match="must be an identifier"):
        registry.register("model", "my model")


def test_a_second_builder_cannot_take_a_registered_name(clean_registry):
    def mlp(num_features, num_classes, seed=0):
        raise AssertionError("never built")

    with pytest.raises(ValueError, match="model 'mlp' is already registered by nordfl.tasks.models"):
        registry.register("model", "mlp", input="flat")(mlp)
    assert registry.lookup("model", "mlp").module == "nordfl.tasks.models"


PLUGIN = textwrap.dedent(
    '''
    from nordfl import registry
    from nordfl.tasks.models import logistic_regression

    @registry.register("model", "{name}", input="flat")
    def wide_logistic(num_features, num_classes, seed=0):
        """Logistic regression with one more (constant) class: a model only a plugin has."""
        return logistic_regression(num_features, num_classes + 1, seed=seed)
    '''
)


def _write_plugin(folder, module, name):
    (folder / f"{module}.py").write_text(PLUGIN.format(name=name))


def test_a_plugin_module_named_by_the_user_registers_a_model(tmp_path, monkeypatch, clean_registry):
    _write_plugin(tmp_path, "study_models", "wide_logistic")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert registry.load_plugins(["study_models"], entry_points=False) == ("study_models",)
    model = make_model("heart", "wide_logistic")
    logits = model.apply(model.init_params, np.zeros((4, 13), np.float32))
    assert logits.shape == (4, 3)  # heart has 2 classes; the plugin's builder added one
    assert registry.lookup("model", "wide_logistic").module == "study_models"


def test_a_missing_plugin_module_is_an_error_naming_it():
    with pytest.raises(ValueError, match="plugins: cannot import 'no_such_study.models': no module named 'no_such_study'"):
        registry.load_plugins(["no_such_study.models"], entry_points=False)


def test_an_installed_distribution_is_found_by_its_entry_point(tmp_path, monkeypatch, clean_registry):
    """A dist-info folder on sys.path is what pip leaves; its entry point names the module."""
    _write_plugin(tmp_path, "site_models", "site_logistic")
    dist = tmp_path / "site_models-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: site-models\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[nordfl.plugins]\nsite_models = site_models\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "site_models" in registry.load_plugins()
    assert registry.lookup("model", "site_logistic").module == "site_models"
