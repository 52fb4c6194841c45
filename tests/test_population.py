"""search.population: trials of one shape trained together train as they would alone (MLPs
exactly; CNNs up to the rounding of grouped vs single convolutions)."""

import dataclasses
import math
import time
from pathlib import Path

import optuna
import pytest
import torch
from mlflow import MlflowClient

from lightning_modules.metrics import EPOCH_METRICS, EPOCHS_RUN, VAL_ACC
from lightning_modules.models import Architecture
from sweeper.loop import population
from sweeper.loop.study import run_study
from sweeper.record import ledger
from sweeper.settings import keys
from sweeper.settings.config import AugmentConfig, Config, DataConfig, ParamSpec
from sweeper.settings.errors import UserError
from sweeper.settings.keys import ROLE_TAG
from sweeper.train import checkpoints, data, training


@pytest.fixture(scope="module")
def splits() -> data.Splits:
    return data.make_splits(data.load(DataConfig(name="mnist_sample")), 1000, 0,
                            torch.device("cpu"))


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_member_trains_exactly_as_its_solo_trial(splits, optimizer):
    base = training.TrialSpec(arch=Architecture("mlp", (32, 32), 0.1), optimizer=optimizer,
                              lr_schedule="cosine", lr=1e-3, weight_decay=0.0, batch_size=64,
                              eval_batch_size=500, steps_per_execution=8, max_epochs=2, seed=5)
    # Own seed, lr, weight decay and dropout per member (one without dropout).
    specs = [dataclasses.replace(base, seed=5 + i, lr=1e-3 * (i + 1),
                                 weight_decay=[0, 1e-4, 0, 1e-3][i],
                                 arch=Architecture("mlp", (32, 32), [0.1, 0.0, 0.3, 0.2][i]))
             for i in range(4)]
    pop = population.build_population(specs, splits)
    # Member 1 stops after epoch 1 (as if pruned): the others must not notice.
    population.fit_population(pop, specs, splits, lambda epoch, m: {1} if epoch == 1 else set())
    assert [len(h) for h in pop.history] == [2, 1, 2, 2]
    assert pop.active == [0, 2, 3]
    for i, spec in enumerate(specs):
        solo = training.build(spec, splits)
        training.fit(solo, spec, splits, lambda epoch, m: False)
        for ep, member in enumerate(pop.history[i]):
            for k in EPOCH_METRICS:
                assert member[k] == pytest.approx(solo.history[ep][k], abs=1e-6), (i, ep, k)
        if i != 1:  # weights of a member still training come out as a plain MLP
            net = population.member_net(pop, i, spec, splits)
            for (k, a), b in zip(net.state_dict().items(), solo.net.state_dict().values(),
                                 strict=True):
                assert torch.allclose(a, b, atol=1e-5), k
    assert pop.history[0] != pop.history[2]  # members really differ


def test_population_study_end_to_end(tiny_cfg: Config, tmp_path: Path, splits):
    tiny_cfg.search.population, tiny_cfg.search.n_trials = 3, 5
    tiny_cfg.search.pruner = "none"
    tiny_cfg.search.space["dropout"] = ParamSpec("float", low=0.0, high=0.5)
    tiny_cfg.search.space["lr"] = ParamSpec("float", low=1e-4, high=3e-3, log=True)
    study = run_study(tiny_cfg)
    trials = study.trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 5
    # Two populations (3 + 2): members share the architecture, not the rest.
    assert [t.user_attrs["population"] for t in trials] == [3, 3, 3, 2, 2]
    for group in (trials[:3], trials[3:]):
        assert len({(t.params["depth"], t.params["width"]) for t in group}) == 1
        assert len({t.params["lr"] for t in group}) == len(group)
    client = MlflowClient(tiny_cfg.tracking.uri)
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id], f"tags.`{ROLE_TAG}` = 'trial'")
    assert len(runs) == 5
    for run in runs:
        assert run.data.params["population"] in ("2", "3")
        assert len(client.get_metric_history(run.info.run_id, VAL_ACC)) == 2
    # A member's kept weights reproduce its recorded validation accuracy.
    best = study.best_trial
    net, _ = checkpoints.load(Path(best.user_attrs[keys.CHECKPOINT]))
    with torch.no_grad():
        acc = (net(splits.x_val).argmax(1) == splits.y_val).double().mean().item()
    assert acc == pytest.approx(best.user_attrs[VAL_ACC], abs=1e-9)


@pytest.mark.slow
def test_grid_population_is_bucketed_by_shape(tiny_cfg: Config):
    tiny_cfg.search.sampler, tiny_cfg.search.pruner = "grid", "none"
    tiny_cfg.search.population, tiny_cfg.search.n_trials = 4, 4
    tiny_cfg.search.space = {"width": ParamSpec("int", low=16, high=32, step=16),
                             "dropout": ParamSpec("float", low=0.0, high=0.2, step=0.2)}
    study = run_study(tiny_cfg)
    points = sorted((t.params["width"], t.params["dropout"]) for t in study.trials)
    assert points == [(16, 0.0), (16, 0.2), (32, 0.0), (32, 0.2)]  # each grid point once
    assert [t.user_attrs["population"] for t in study.trials] == [2, 2, 2, 2]


def test_population_is_for_mlps_and_cnns():
    from sweeper.settings.config import validate

    cfg = Config()
    cfg.search.space = {"width": ParamSpec("int", low=16, high=32)}
    cfg.search.population = 0
    with pytest.raises(UserError, match=r"search.population=0 must be >= 1"):
        validate(cfg)
    cfg.search.population, cfg.model.family = 4, "cnn"
    cfg.augment.name, cfg.trainer.label_smoothing = "elastic", 0.1
    validate(cfg)
    cfg.model.family = "resnet"
    with pytest.raises(UserError, match=r"works for model=mlp and model=cnn"):
        validate(cfg)
    cfg.model.family, cfg.augment.name = "cnn", "none"
    cfg.search.space["augment_strength"] = ParamSpec("float", low=0.0, high=2.0)
    with pytest.raises(UserError, match=r"augment_strength scales the augmentation: pick one"):
        validate(cfg)


CNN_ARCH = (4, 8)  # under training.CHANNELS_LAST_MIN: the solo runs stay NCHW like the population


def cnn_specs(n: int, epochs: int = 2) -> list[training.TrialSpec]:
    """n CNN trials of one shape differing in seed, lr, weight decay, dropout, label smoothing
    and augmentation strength (the last at 0: no augmentation at all)."""
    aug = AugmentConfig(name="elastic")
    base = training.TrialSpec(arch=Architecture("cnn", CNN_ARCH, 0.1), optimizer="adam",
                              lr_schedule="onecycle", lr=3e-3, weight_decay=0.0, batch_size=64,
                              eval_batch_size=500, steps_per_execution=8, max_epochs=epochs,
                              seed=5)
    out = []
    for i in range(n):
        k = [1.0, 0.5, 0.0][i % 3]
        scaled = dataclasses.replace(aug, rotate=aug.rotate * k, translate=aug.translate * k,
                                     scale=aug.scale * k, elastic_alpha=aug.elastic_alpha * k)
        out.append(dataclasses.replace(
            base, seed=5 + i, lr=3e-3 * (i + 1), weight_decay=[0, 1e-4, 0][i % 3],
            label_smoothing=[0.1, 0.0, 0.05][i % 3], augment=scaled, augment_strength=k,
            arch=Architecture("cnn", CNN_ARCH, [0.1, 0.0, 0.3][i % 3])))
    return out


def test_members_are_augmented_exactly_as_alone():
    from lightning_modules.augment import BatchAugment, warp_members

    def augs():
        return [BatchAugment(10 * k, 0.1 * k, 0.1 * k, 34 * k, 4.0, seed=s)
                for k, s in [(1.0, 1), (0.5, 2), (0.0, 3)]]

    together, alone = augs(), augs()
    x = torch.rand(3, 16, 1, 28, 28)
    for _ in range(2):  # the second batch: each generator moved on as its solo one does
        got = warp_members(together, x)
        for i in range(3):
            assert torch.equal(got[i], alone[i](x[i])), i
    assert not torch.equal(got[0], got[1])


def test_cnn_member_step_matches_its_solo_step(splits):
    specs = [dataclasses.replace(s, arch=dataclasses.replace(s.arch, dropout=0.0))
             for s in cnn_specs(3)]  # no dropout: one step compares without random masks
    pop = population.build_population(specs, splits)
    solos = [training.build(s, splits) for s in specs]
    x = splits.x_train[:64 * 3].view(3, 64, 1, 28, 28)
    y = splits.y_train[:64 * 3].view(3, 64)
    pop.net.eval()
    shared = pop.net.forward_shared(x[0])
    pop.net.train()
    logits = pop.net(x)
    pop._loss(logits, y).sum().backward()
    for i, solo in enumerate(solos):
        solo.net.eval()
        assert torch.allclose(shared[i], solo.net(x[0]), atol=1e-5)
        solo.net.train()
        out = solo.net(x[i])
        assert torch.allclose(logits[i], out, atol=1e-5)
        torch.nn.functional.cross_entropy(out, y[i],
                                          label_smoothing=specs[i].label_smoothing).backward()
        for key, p in solo.net.named_parameters():
            g = getattr(pop.net, key.replace(".", "__")).grad[i]
            assert torch.allclose(g, p.grad, rtol=1e-3, atol=1e-4), (i, key)
        state = pop.net.member_state(i)
        for key, v in solo.net.state_dict().items():  # batch-norm statistics included
            assert torch.allclose(state[key].to(v.dtype), v, atol=1e-6), (i, key)


@pytest.mark.slow
def test_cnn_member_trains_as_its_solo_trial(splits):
    specs = cnn_specs(3)
    pop = population.build_population(specs, splits)
    population.fit_population(pop, specs, splits, lambda epoch, m: {1} if epoch == 1 else set())
    assert [len(h) for h in pop.history] == [2, 1, 2]
    for i, spec in enumerate(specs):
        solo = training.build(spec, splits)
        training.fit(solo, spec, splits, lambda epoch, m: False)
        for ep, member in enumerate(pop.history[i]):
            # Rounding (grouped convolutions) grows over 2 epochs; a wrong lr, mask, label
            # smoothing or augmentation moves these by far more.
            for k in (VAL_ACC, "train_acc"):
                assert member[k] == pytest.approx(solo.history[ep][k], abs=0.006), (i, ep, k)
            for k in ("val_loss", "train_loss"):
                assert member[k] == pytest.approx(solo.history[ep][k], abs=0.01), (i, ep, k)
        if i != 1:  # a member's weights come out as a plain CNN with its recorded accuracy
            net = population.member_net(pop, i, spec, splits)
            assert training.accuracy(net, splits.x_val, splits.y_val) == pytest.approx(
                pop.history[i][-1][VAL_ACC], abs=1e-9)
    assert pop.history[0] != pop.history[2]


@pytest.mark.slow
def test_cnn_population_study_and_its_seed_repeats(tiny_cfg: Config, splits):
    tiny_cfg.model.family, tiny_cfg.model.depth, tiny_cfg.model.width = "cnn", 2, 4
    tiny_cfg.augment.name = "affine"
    tiny_cfg.search.population, tiny_cfg.search.n_trials = 2, 2
    tiny_cfg.search.pruner = "none"
    tiny_cfg.search.space = {
        "lr": ParamSpec("float", low=1e-3, high=5e-3, log=True),
        "augment_strength": ParamSpec("float", low=0.0, high=1.5),
        "label_smoothing": ParamSpec("float", low=0.0, high=0.2)}
    tiny_cfg.confirm.seeds, tiny_cfg.confirm.top_k = 3, 1
    study = run_study(tiny_cfg)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert [t.user_attrs["population"] for t in study.trials] == [2, 2]
    best = study.best_trial
    client = MlflowClient(tiny_cfg.tracking.uri)
    exp = client.get_experiment_by_name("tiny")
    repeats = client.search_runs([exp.experiment_id], f"tags.`{ROLE_TAG}` = 'repeat'")
    # The best trial's 2 repeats trained as one population, each its own run and seed.
    assert len(repeats) == 2
    assert {r.data.params["population"] for r in repeats} == {"2"}
    assert len({r.data.params["seed"] for r in repeats}) == 2
    assert {r.data.params["augment_strength"] for r in repeats} == {
        str(best.params["augment_strength"])}
    for k in (1, 2):
        record = study.user_attrs[f"{keys.REPEAT}.{best.number}.{k}"]
        assert VAL_ACC in record, record
        # The kept weights of each repeat reproduce its recorded validation accuracy.
        path = checkpoints.repeat_path(Path(best.user_attrs[keys.CHECKPOINT]), k)
        net, _ = checkpoints.load(path)
        assert training.accuracy(net, splits.x_val, splits.y_val) == pytest.approx(
            record[VAL_ACC], abs=1e-9)


@pytest.mark.slow
def test_a_population_larger_than_memory_is_split(tiny_cfg: Config, monkeypatch):
    monkeypatch.setattr(population, "_MEMBER_BYTES", {})
    seen: list[int] = []
    real = population.member_bytes

    def measured(spec, splits):
        seen.append(spec.batch_size)
        return real(spec, splits)

    monkeypatch.setattr(population, "member_bytes", measured)
    tiny_cfg.search.population, tiny_cfg.search.n_trials = 5, 5
    tiny_cfg.search.pruner = "none"
    tiny_cfg.search.space = {"lr": ParamSpec("float", low=1e-4, high=3e-3, log=True)}
    spec = training.resolve(tiny_cfg, {}, 0)
    splits_ = data.make_splits(data.load(tiny_cfg.data), 1000, 0, torch.device("cpu"))
    per_member = real(spec, splits_)
    # Free memory for 2.5 members: the 5 asked together train as 3 populations (2, 2, 1).
    monkeypatch.setattr(population, "free_bytes",
                        lambda device: int(2.5 * per_member / population.MEMORY_SHARE))
    study = run_study(tiny_cfg)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 5
    assert sorted(t.user_attrs["population"] for t in study.trials) == [1, 2, 2, 2, 2]
    assert seen == [spec.batch_size]  # measured once per shape


def test_member_memory_estimate_grows_with_what_it_holds(splits):
    spec = cnn_specs(1)[0]
    small = population.member_bytes(spec, splits)
    assert population.member_bytes(dataclasses.replace(spec, batch_size=256), splits) > small
    assert population.member_bytes(dataclasses.replace(spec, eval_batch_size=5000),
                                   splits) > small
    wider = dataclasses.replace(spec, arch=dataclasses.replace(spec.arch, hidden=(16, 32)))
    assert population.member_bytes(wider, splits) > 2 * small
    # At least the activations one 64-image batch keeps: conv1's output, 4 x 28 x 28 floats.
    assert small > 64 * 4 * 28 * 28 * 4
    # What one member holds does not depend on how much training data there is.
    fewer = data.make_splits(data.load(DataConfig(name="mnist_sample")), 1000, 0,
                             torch.device("cpu"), train_size=500)
    assert population.member_bytes(spec, fewer) == small


@pytest.mark.slow
def test_later_populations_are_pruned_against_finished_trials(tiny_cfg: Config):
    """Members read the study through one snapshot per ask phase and per epoch: the pruner
    must still see the trials that finished before (here the first population)."""
    tiny_cfg.search.population, tiny_cfg.search.n_trials = 4, 8
    tiny_cfg.search.sampler, tiny_cfg.search.pruner = "random", "median"
    tiny_cfg.search.pruner_startup_trials, tiny_cfg.search.pruner_warmup_epochs = 1, 0
    tiny_cfg.trainer.max_epochs = 3
    tiny_cfg.search.space = {"lr": ParamSpec("float", low=1e-5, high=1e-2, log=True)}
    study = run_study(tiny_cfg)
    states = [t.state for t in study.trials]
    assert states[:4] == [optuna.trial.TrialState.COMPLETE] * 4  # nothing to compare with yet
    assert optuna.trial.TrialState.PRUNED in states[4:], states


def test_the_snapshot_storage_is_only_lent_for_the_ask(tiny_cfg: Config, monkeypatch):
    """While a population is asked, reads see every trial asked so far (TPE's constant liar
    needs the running members); afterwards the study and its trials use the real storage,
    also when asking fails half way."""
    tiny_cfg.search.pruner = "none"
    study = optuna.create_study(storage=tiny_cfg.search.storage, study_name="snap",
                                direction="maximize")
    real = study._storage
    seen: list[int] = []
    suggest = population.search_space.suggest

    def counting(trial, space, depth):
        running = study._storage.get_all_trials(study._study_id, deepcopy=False,
                                                states=(optuna.trial.TrialState.RUNNING,))
        seen.append(len(running))
        before.append([t.params for t in running])
        return suggest(trial, space, depth)

    before: list[list[dict]] = []
    monkeypatch.setattr(population.search_space, "suggest", counting)
    asked = population.ask(study, tiny_cfg, 3)
    assert seen == [0, 1, 2]  # each member sees the members asked before it (running)
    stored = [t.params for t in study.get_trials()]  # ... with the params they were given
    assert before[2] == stored[:2] and all(stored)
    assert study._storage is real and all(t.storage is real for t, _ in asked)

    def broken(trial, space, depth):
        raise RuntimeError("sampler failed")

    monkeypatch.setattr(population.search_space, "suggest", broken)
    with pytest.raises(RuntimeError, match="sampler failed"):
        population.ask(study, tiny_cfg, 2)
    assert study._storage is real


@pytest.mark.slow
def test_a_population_writes_only_the_weights_it_keeps(tiny_cfg: Config, monkeypatch):
    saved: list[int] = []
    real = checkpoints.save

    def save(cfg, number, *args):
        saved.append(number)
        return real(cfg, number, *args)

    monkeypatch.setattr(checkpoints, "save", save)
    tiny_cfg.search.population, tiny_cfg.search.n_trials = 5, 5
    tiny_cfg.search.pruner, tiny_cfg.search.keep_top_k = "none", 2
    tiny_cfg.search.space = {"lr": ParamSpec("float", low=1e-4, high=3e-3, log=True)}
    study = run_study(tiny_cfg)
    best = sorted(study.trials, key=lambda t: (-t.value, t.number))[:2]
    assert sorted(saved) == sorted(t.number for t in best)  # 2 files written, not 5
    for t in study.trials:  # every complete trial says where its weights are (or would be)
        assert Path(t.user_attrs[keys.CHECKPOINT]).is_file() == (t in best)


@pytest.mark.slow
def test_a_refused_metrics_write_fails_the_population(tiny_cfg: Config, monkeypatch):
    from sweeper.record.tracking import Tracker

    def refuse(self, run_id, metrics, step):
        raise RuntimeError("the store refused the write")

    monkeypatch.setattr(Tracker, "log_metrics", refuse)
    tiny_cfg.search.population, tiny_cfg.search.n_trials = 2, 2
    tiny_cfg.trainer.max_epochs = 3
    tiny_cfg.search.pruner, tiny_cfg.search.max_consecutive_failures = "none", 2
    with pytest.raises(UserError, match="2 trials failed in a row"):
        run_study(tiny_cfg)
    study = optuna.load_study(study_name="tiny", storage=tiny_cfg.search.storage)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.FAIL] * 2
    assert all("the store refused the write" in t.user_attrs[keys.ERROR] for t in study.trials)
    # Found after the first epoch (the write runs on a background thread), not after the third.
    assert {t.user_attrs[EPOCHS_RUN] for t in study.trials} <= {1, 2}


@pytest.mark.slow
def test_a_refused_run_end_is_raised_after_every_member_is_told(tiny_cfg: Config, monkeypatch):
    """Run ends go through the population's background writer: a store that refuses them
    stops the study with its error, but only after Optuna has every member's result."""
    from sweeper.record.tracking import Tracker

    def refuse(self, run_id, state, metrics, error=None, status=None):
        raise RuntimeError("the store refused the end")

    monkeypatch.setattr(Tracker, "end_trial", refuse)
    tiny_cfg.search.population, tiny_cfg.search.n_trials = 3, 3
    tiny_cfg.search.pruner = "none"
    with pytest.raises(RuntimeError, match="refused the end"):
        run_study(tiny_cfg)
    study = optuna.load_study(study_name="tiny", storage=tiny_cfg.search.storage)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 3


@pytest.mark.slow
def test_member_runs_hold_params_metrics_and_end_in_order(tiny_cfg: Config):
    """Runs are made, and their params logged, on the background writer: each member's run
    has its own params, every epoch's metrics and its end state."""
    tiny_cfg.search.population, tiny_cfg.search.n_trials = 3, 3
    tiny_cfg.search.pruner = "none"
    tiny_cfg.search.space = {"lr": ParamSpec("float", low=1e-4, high=3e-3, log=True)}
    study = run_study(tiny_cfg)
    client = MlflowClient(tracking_uri=tiny_cfg.tracking.uri)
    for t in study.trials:
        run = client.get_run(t.user_attrs[keys.MLFLOW_RUN_ID])
        assert run.info.status == "FINISHED" and run.data.tags[keys.TRIAL_TAG] == str(t.number)
        assert float(run.data.params["lr"]) == pytest.approx(t.params["lr"])
        assert run.data.params[keys.POPULATION] == "3"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, VAL_ACC)]
        assert sorted(steps) == [1, 2]


def memory_for(monkeypatch, most: int, error: BaseException) -> list[int]:
    """fit_population raises `error` for populations larger than `most` (a fresh process's
    out-of-memory caps); returns the sizes it was called with."""
    monkeypatch.setattr(population, "_OOM_CAP", {})
    sizes: list[int] = []
    fit = population.fit_population

    def small_memory(module, specs, splits, on_epoch):
        sizes.append(len(specs))
        if len(specs) > most:
            raise error
        return fit(module, specs, splits, on_epoch)

    monkeypatch.setattr(population, "fit_population", small_memory)
    return sizes


@pytest.mark.slow
def test_an_out_of_memory_population_runs_again_in_halves(tiny_cfg: Config, monkeypatch):
    """A population that runs out of memory despite the estimate: its trials fail saying so
    (not counted as failures in a row), their configurations are queued again, and they train
    in populations at most half as big."""
    sizes = memory_for(monkeypatch, 2,
                       torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    tiny_cfg.search.population, tiny_cfg.search.n_trials = 4, 4
    tiny_cfg.search.pruner, tiny_cfg.search.max_consecutive_failures = "none", 2
    tiny_cfg.search.space = {"lr": ParamSpec("float", low=1e-4, high=3e-3, log=True)}
    study = run_study(tiny_cfg)
    assert sizes == [4, 2, 2]
    trials = study.trials
    failed, retried = trials[:4], trials[4:]
    assert all(t.state == optuna.trial.TrialState.FAIL for t in failed)
    assert all("out of memory in a population of 4" in t.user_attrs[keys.ERROR] and
               t.user_attrs[keys.SPLIT_AFTER_OOM] == 2 for t in failed)
    assert [t.state for t in retried] == [optuna.trial.TrialState.COMPLETE] * 4
    assert [t.user_attrs[keys.RETRY_OF] for t in retried] == [0, 1, 2, 3]
    assert [t.params for t in retried] == [t.params for t in failed]


@pytest.mark.slow
def test_a_population_of_two_out_of_memory_retries_one_by_one(tiny_cfg: Config, monkeypatch):
    sizes = memory_for(monkeypatch, 1, MemoryError())
    tiny_cfg.search.population, tiny_cfg.search.n_trials = 2, 2
    tiny_cfg.search.pruner, tiny_cfg.search.max_consecutive_failures = "none", 2
    study = run_study(tiny_cfg)
    assert sizes == [2, 1, 1]
    assert [t.state.name for t in study.trials] == ["FAIL", "FAIL", "COMPLETE", "COMPLETE"]


@pytest.mark.slow
@pytest.mark.parametrize("failure", [RuntimeError, KeyboardInterrupt])
def test_runs_made_before_a_failing_build_are_ended(tiny_cfg: Config, monkeypatch, failure):
    """Member runs are made on the writer's thread while the population is built: when the
    build fails (or Ctrl-C), the runs already made end FAILED (KILLED) instead of staying
    RUNNING."""
    build = population.build_population

    def broken(specs, splits):
        if len(specs) == 1:  # the memory estimate's population of one
            return build(specs, splits)
        client = MlflowClient(tracking_uri=tiny_cfg.tracking.uri)
        deadline = time.time() + 30
        while len(client.search_runs(client.get_experiment_by_name("tiny").experiment_id,
                                     filter_string=f"tags.`{ROLE_TAG}` = 'trial'")) < 2:
            assert time.time() < deadline, "the member runs were never made"
            time.sleep(0.05)  # the runs get made meanwhile, on the writer's thread
        raise failure("cannot build")

    monkeypatch.setattr(population, "build_population", broken)
    tiny_cfg.search.population, tiny_cfg.search.n_trials = 2, 2
    tiny_cfg.search.pruner, tiny_cfg.search.max_consecutive_failures = "none", 2
    with pytest.raises(UserError if failure is RuntimeError else KeyboardInterrupt):
        run_study(tiny_cfg)
    client = MlflowClient(tracking_uri=tiny_cfg.tracking.uri)
    runs = client.search_runs(client.get_experiment_by_name("tiny").experiment_id,
                              filter_string=f"tags.`{ROLE_TAG}` = 'trial'")
    status = "FAILED" if failure is RuntimeError else "KILLED"
    assert len(runs) == 2 and {r.info.status for r in runs} == {status}
    if failure is RuntimeError:  # a failed population's runs keep their params
        assert all(r.data.params.get("lr") for r in runs)


@pytest.mark.slow
def test_out_of_memory_reruns_only_the_members_still_training(tiny_cfg: Config, monkeypatch):
    """A member that had diverged before the population ran out of memory keeps its own end
    (FAIL, diverged); only the others are queued again."""
    monkeypatch.setattr(population, "_OOM_CAP", {})
    sizes: list[int] = []
    fit = population.fit_population

    def diverge_then_oom(module, specs, splits, on_epoch):
        sizes.append(len(specs))
        if len(specs) < 3:
            return fit(module, specs, splits, on_epoch)
        on_epoch(1, {0: {VAL_ACC: math.nan}, 1: {VAL_ACC: 0.5}, 2: {VAL_ACC: 0.5}})
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(population, "fit_population", diverge_then_oom)
    tiny_cfg.search.population, tiny_cfg.search.n_trials = 3, 3
    tiny_cfg.search.pruner, tiny_cfg.search.max_consecutive_failures = "none", 3
    study = run_study(tiny_cfg)
    trials = study.trials
    assert sizes == [3, 1, 1, 1]
    assert "diverged" in trials[0].user_attrs[keys.ERROR]
    assert keys.SPLIT_AFTER_OOM not in trials[0].user_attrs
    assert all(keys.SPLIT_AFTER_OOM in t.user_attrs for t in trials[1:3])
    assert [t.user_attrs.get(keys.RETRY_OF) for t in trials[3:]] == [1, 2, None]
    assert [t.state.name for t in trials] == ["FAIL"] * 3 + ["COMPLETE"] * 3


@pytest.mark.slow
def test_a_split_lost_to_ctrl_c_is_queued_at_the_next_start(tiny_cfg: Config, monkeypatch):
    """Ctrl-C between an out-of-memory member's FAIL and its queueing: the next run queues
    that configuration again (it is not running, so nothing else would)."""
    memory_for(monkeypatch, 1, torch.OutOfMemoryError("CUDA out of memory"))
    real = ledger.Ledger.requeue
    calls: list[int] = []

    def interrupted_once(self, trial):
        calls.append(trial.number)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real(self, trial)

    monkeypatch.setattr(ledger.Ledger, "requeue", interrupted_once)
    tiny_cfg.search.population, tiny_cfg.search.n_trials = 2, 2
    tiny_cfg.search.pruner = "none"
    with pytest.raises(KeyboardInterrupt):
        run_study(tiny_cfg)
    first = optuna.load_study(study_name="tiny", storage=tiny_cfg.search.storage).trials
    assert keys.SPLIT_AFTER_OOM in first[0].user_attrs  # told FAIL, never queued
    assert not any(t.user_attrs.get(keys.RETRY_OF) == 0 for t in first)
    # The member not yet told was released, not left RUNNING until another start found it dead
    # (before: the interrupted tell_all stopped holding it; the next start waited out the grace).
    assert first[1].state == optuna.trial.TrialState.FAIL
    assert [t.user_attrs.get(keys.RETRY_OF) for t in first[2:]] == [1]  # queued again
    monkeypatch.setattr(population, "_OOM_CAP", {})  # a new process
    study = run_study(tiny_cfg)
    retries = {t.user_attrs.get(keys.RETRY_OF): t for t in study.trials}
    assert retries[0].params == first[0].params
    assert n_complete(study) == 2


def n_complete(study: optuna.Study) -> int:
    return sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
