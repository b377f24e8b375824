"""pfl-research peer: Apple's pfl simulator (``SimulatedBackend``) with a PyTorch model.

Runs in its own virtual environment (pfl, CPU PyTorch, NumPy; no NordFL) as
``python -m benchmarks.peers.pfl_research --workload W.json --out DIR``.

The pfl APIs used, and why:

- ``PyTorchModel``: wraps a ``torch.nn.Module`` with ``loss``/``metrics`` (Linear 60->10,
  or the 784-512-512-10 ReLU MLP), started from the data file's ``init_*`` arrays. Local
  optimizer: ``torch.optim.SGD`` (pfl sets its lr from ``NNTrainHyperParams``); central
  optimizer: SGD with lr 1.0, which applies the averaged model difference as it is.
- ``FederatedDataset`` with pfl's ``MinimizeReuseUserSampler`` over the flattened cohort
  table: that sampler cycles through its list, so the ``cohort_size`` users drawn in round
  r are exactly ``cohorts[r]``, in order.
- A ``Dataset`` subclass whose ``iter`` shuffles: pfl's ``Dataset.iter`` slices a user's
  rows in stored order every epoch; the contract wants a fresh order each epoch.
- ``SimulatedBackend`` with ``WeightByDatapoints`` for FedAvg and FedProx: pfl's model
  differences carry weight 1 each (a plain mean over users) unless a weighting
  postprocessor re-weights them; the contract weights by rows. SCAFFOLD keeps the plain
  mean, as the contract says.
- ``FederatedAveraging``, ``FedProx`` (``FedProxParams.mu``) and ``SCAFFOLD``
  (``SCAFFOLDParams``: option II, ``population`` = all clients, ``InMemoryUserStateStorage``
  for each client's c_i): all three are pfl's own algorithms.
- A ``TrainingProcessCallback`` whose ``after_central_iteration`` times the rounds.

pfl evaluates every trained user before and after local training whenever
``iteration % evaluation_frequency == 0``, so always in round 0; the module's ``metrics``
returns no metrics, which makes those passes do nothing. No DP, no central evaluation.

pfl 0.6.0's SCAFFOLD update of c_i has the opposite sign of the paper's (its own tests
expect it), so the W4-scaffold run is pfl as shipped and its result notes say so.
"""

from __future__ import annotations

from benchmarks.peers import common  # first: starts the set-up clock

import numpy as np
import torch
from pfl.aggregate.simulate import SimulatedBackend
from pfl.aggregate.weighting import WeightByDatapoints
from pfl.algorithm import SCAFFOLD, FederatedAveraging, FedProx, FedProxParams, NNAlgorithmParams
from pfl.algorithm.scaffold import SCAFFOLDParams
from pfl.callback.base import TrainingProcessCallback
from pfl.data.dataset import Dataset
from pfl.data.federated_dataset import FederatedDataset
from pfl.data.sampling import MinimizeReuseUserSampler
from pfl.data.user_state import InMemoryUserStateStorage
from pfl.hyperparam import NNTrainHyperParams
from pfl.metrics import Metrics
from pfl.model.pytorch import PyTorchModel

PACKAGES = ("pfl", "torch")
SCAFFOLD_NOTE = ("pfl's SCAFFOLD (option II) sets c_i' = c_i - c + (w - w_global) / (K * lr), the opposite sign "
                 "of the paper's (w_global - w), so its control variates push the drift the wrong way and its "
                 "loss is not the contract's; its cost per round is the same")


class Net(torch.nn.Sequential):
    """Linear layers with ReLU between them, plus the ``loss`` and ``metrics`` pfl calls."""

    def __init__(self, init: dict):
        layers = []
        for i in range(len(init) // 2):
            w, b = init[f"w{i}"], init[f"b{i}"]
            linear = torch.nn.Linear(*w.shape)
            with torch.no_grad():
                linear.weight.copy_(torch.from_numpy(w.T.copy()))
                linear.bias.copy_(torch.from_numpy(b))
            layers += [linear, torch.nn.ReLU()]
        super().__init__(*layers[:-1])

    def loss(self, x, y):
        return torch.nn.functional.cross_entropy(self(x), y)

    def metrics(self, x, y):
        return {}  # no per-user evaluation (see the module docstring)

    def params(self) -> dict:
        linears = [m for m in self if isinstance(m, torch.nn.Linear)]
        out = {}
        for i, m in enumerate(linears):
            out[f"w{i}"] = m.weight.detach().numpy().T.copy()
            out[f"b{i}"] = m.bias.detach().numpy().copy()
        return out


class ShuffledDataset(Dataset):
    """A user's rows, visited in a fresh random order at every epoch (each ``iter`` call)."""

    def __init__(self, x, y, user_id, generator: torch.Generator):
        super().__init__((x, y), user_id=user_id)
        self._generator = generator

    def iter(self, batch_size):
        x, y = self.raw_data
        order = torch.randperm(len(y), generator=self._generator)
        x, y = x[order], y[order]
        step = batch_size or len(y)
        for start in range(0, len(y), step):
            yield x[start:start + step], y[start:start + step]


class RoundTimer(TrainingProcessCallback):
    def __init__(self, recorder: common.Recorder):
        self.recorder = recorder

    def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
        self.recorder.round_done(central_iteration)
        return False, Metrics()


def algorithm_and_params(w: common.Workload):
    shared = {"central_num_iterations": w.rounds, "evaluation_frequency": w.rounds,
              "train_cohort_size": w.cohort_size, "val_cohort_size": None}
    if w.algorithm == "fedavg":
        return FederatedAveraging(), NNAlgorithmParams(**shared), [WeightByDatapoints()]
    if w.algorithm == "fedprox":
        return FedProx(), FedProxParams(mu=w.mu, **shared), [WeightByDatapoints()]
    if w.algorithm == "scaffold":
        params = SCAFFOLDParams(population=w.num_clients, use_gradient_as_control_variate=False,
                                user_state_storage=InMemoryUserStateStorage(), **shared)
        return SCAFFOLD(), params, []
    raise ValueError(f"unknown algorithm {w.algorithm!r}")


def main() -> None:
    w, out = common.parse_args(__doc__.splitlines()[0])
    recorder = common.Recorder("pfl_research", w, out)
    data = common.Data(w.data)
    np.random.seed(w.seed)  # pfl draws its own seeds from NumPy's global generator
    torch.manual_seed(w.seed)
    # One thread: batches of 10 rows are too small to split, and on a busy 2-core machine two
    # OpenMP threads spin against each other (W3 ran ~10x slower with torch's default of 2).
    torch.set_num_threads(1)

    x = torch.from_numpy(data.x)
    y = torch.from_numpy(data.y.astype(np.int64))
    shuffles = torch.Generator().manual_seed(w.seed)
    federated = FederatedDataset(
        make_dataset_fn=lambda k: ShuffledDataset(x[k], y[k], k, shuffles),
        user_sampler=MinimizeReuseUserSampler(data.cohorts.reshape(-1).tolist()))

    net = Net(data.init)
    model = PyTorchModel(net, local_optimizer_create=torch.optim.SGD,
                         central_optimizer=torch.optim.SGD(net.parameters(), lr=1.0))
    algorithm, algorithm_params, postprocessors = algorithm_and_params(w)
    backend = SimulatedBackend(training_data=federated, val_data=None, postprocessors=postprocessors)
    train_params = NNTrainHyperParams(local_num_epochs=w.epochs, local_learning_rate=w.lr,
                                      local_batch_size=w.batch_size)

    recorder.ready()
    algorithm.run(algorithm_params, backend, model, train_params, callbacks=[RoundTimer(recorder)],
                  send_metrics_to_platform=False)  # no per-round metrics printout
    recorder.finish(net.params(), packages=PACKAGES, notes=SCAFFOLD_NOTE if w.algorithm == "scaffold" else "")


if __name__ == "__main__":
    main()
