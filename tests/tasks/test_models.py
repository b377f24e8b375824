"""Models are graphdef + plain params; apply is a pure function that vmaps over params."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nordfl.tasks import cnn, logistic_regression, make_task, mlp


@pytest.mark.parametrize(
    "model, x",
    [
        (logistic_regression(13, 2), np.ones((4, 13), np.float32)),
        (mlp(60, 10, hidden=(8, 8)), np.ones((4, 60), np.float32)),
        (cnn((8, 8, 1), 10), np.ones((4, 8, 8, 1), np.float32)),
    ],
    ids=["logreg", "mlp", "cnn"],
)
def test_apply_is_pure_and_vmaps_over_params(model, x):
    logits = model.apply(model.init_params, jnp.asarray(x))
    assert logits.shape[0] == 4
    doubled = jax.tree_util.tree_map(lambda p: jnp.stack([p, 2 * p]), model.init_params)
    both = jax.vmap(model.apply, in_axes=(0, None))(doubled, jnp.asarray(x))
    np.testing.assert_allclose(both[0], logits, rtol=1e-5, atol=1e-6)
    assert not np.allclose(both[1], logits)


def test_logistic_regression_is_x_w_plus_b():
    model = logistic_regression(3, 2)
    x = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    p = model.init_params["linear"]
    want = x @ np.asarray(p["kernel"]) + np.asarray(p["bias"])
    np.testing.assert_allclose(model.apply(model.init_params, jnp.asarray(x)), want, rtol=1e-5, atol=1e-6)


def test_make_task_rejects_unknown_names():
    with pytest.raises(ValueError, match="task.name: unknown name 'mnist'; expected one of digits, heart, study, synthetic, synthetic_iid"):
        make_task("mnist")
    with pytest.raises(ValueError, match="task.model: unknown name 'resnet'"):
        make_task("heart", model="resnet")
    with pytest.raises(ValueError, match=r"task.model: cnn needs image features \[H, W, C\]; task heart has feature shape \(13,\)"):
        make_task("heart", model="cnn")
