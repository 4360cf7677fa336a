"""A site's own policy (``fedtune client --policy``): the file checked when the
daemon starts, each rule enforced before any record is read, nothing charged."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pytest
import yaml
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedtune.client import policy, privacy, site
from fedtune.client.app import make_client_app
from fedtune.client.ledger import Budget, PrivacyLedger
from fedtune.client.node.daemon import ClientOptions, site_policy, supernode_command
from fedtune.client.releases import Book
from fedtune.common import config, records
from fedtune.common.errors import DeploymentError
from fedtune.common.model import adapter_state, build_model
from fedtune.server.runtime import stats
from tests.conftest import tiny_config


def _write(tmp_path: Path, rules: object) -> Path:
    path = tmp_path / "site-policy.yaml"
    path.write_text(rules if isinstance(rules, str) else yaml.safe_dump(rules))
    return path


def _cfg(tiny_bert: Path, review_files: tuple[Path, Path], **sections: dict
         ) -> config.RunConfig:
    return config.from_dict(tiny_config(tiny_bert, *review_files, **sections))


@pytest.mark.parametrize(("rules", "named"), [
    ({"max_epsilon": 8}, "unknown key(s) 'max_epsilon'"),
    ({"require_dp": False}, "only with the daemon's --allow-non-private"),
    ({"max_epsilon_per_run": "eight"}, "max_epsilon_per_run: expected a number"),
    ({"min_noise_multiplier": -1}, "min_noise_multiplier: expected a number >= 0"),
    ({"allowed_tasks": ["translation"]}, "allowed_tasks: unknown task(s)"),
    ({"allowed_noise": ["pooled"]}, "allowed_noise: unknown noise ['pooled']"),
    ({"allowed_models": ["sha256:abc"]}, "is not a sha256"),
    ({"allowed_models": 3}, "allowed_models: expected a list of names"),
    ({"personalized_adapters": "no"}, "personalized_adapters: expected true or false"),
    (["a", "list"], "a site policy is a mapping"),
    ("max_epsilon_per_run: [1\n", "not valid YAML"),
])
def test_a_bad_policy_file_is_refused_naming_the_key(tmp_path: Path, rules: object,
                                                     named: str) -> None:
    path = _write(tmp_path, rules)
    with pytest.raises(DeploymentError) as info:
        policy.load(path)
    assert named in str(info.value) and str(path) in str(info.value)


def test_the_daemon_checks_the_policy_and_hands_it_to_the_site(
        tmp_path: Path, review_files: tuple[Path, Path]) -> None:
    path = _write(tmp_path, {"max_epsilon_per_run": 4, "budget_epsilon": 20})
    opts = ClientOptions(superlink="127.0.0.1:9092", data_path=review_files[0],
                         ledger_dir=tmp_path / "ledger", ca_cert=None, node_key=None,
                         insecure=True, state_dir=tmp_path / "state", policy=path)
    argv, _ = supernode_command(opts)
    node_config = argv[argv.index("--node-config") + 1]
    assert f'site-policy="{path.resolve()}"' in node_config
    assert "budget-epsilon=20.0" in node_config  # the policy's total budget
    assert "allow-non-private" not in node_config
    # one total budget: --budget-epsilon and the policy must not disagree
    with pytest.raises(DeploymentError, match="set the site's total budget in one"):
        site_policy(ClientOptions(**{**opts.__dict__, "budget_epsilon": 10.0}))
    loud = ClientOptions(**{**opts.__dict__, "policy": None,
                            "allow_non_private": True})
    argv, _ = supernode_command(loud)
    assert "allow-non-private=true" in argv[argv.index("--node-config") + 1]
    with pytest.raises(DeploymentError, match="nope.yaml: no such file"):
        site_policy(ClientOptions(**{**opts.__dict__,
                                     "policy": tmp_path / "nope.yaml"}))


def test_each_rule_declines_a_run_that_breaks_it(
        tmp_path: Path, tiny_bert: Path, review_files: tuple[Path, Path]) -> None:
    cfg = _cfg(tiny_bert, review_files)
    weights = next(tiny_bert.glob("*.safetensors"))
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    strict = policy.SitePolicy(
        max_epsilon_per_run=cfg.privacy.target_epsilon,
        max_clipping_norm=cfg.privacy.max_grad_norm, min_noise_multiplier=0.5,
        allowed_models=(f"sha256:{digest}",), allowed_tasks=("classification",),
        personalized_adapters=False)
    policy.enforce(strict, cfg)  # the run as it is: within every rule
    policy.enforce(None, cfg)  # a simulated site: no policy
    cases = [
        ({"privacy": {"enabled": False}}, "dp-required"),
        ({"privacy": {"target_epsilon": 2 * cfg.privacy.target_epsilon}},
         "max_epsilon_per_run"),
        ({"privacy": {"max_grad_norm": 2 * cfg.privacy.max_grad_norm}},
         "max_clipping_norm"),
        ({"privacy": {"noise_multiplier": 0.3}}, "min_noise_multiplier"),
        ({"model": {"name_or_path": str(tmp_path / "other-model"),
                    "head_init": "random"}}, "allowed_models"),
    ]
    for sections, rule in cases:
        run = _cfg(tiny_bert, review_files, **sections)
        with pytest.raises(policy.PolicyDeclined) as info:
            policy.enforce(strict, run)
        assert info.value.rule == rule
        assert str(info.value).startswith(f"SitePolicy on the site: rule {rule}: ")
    with pytest.raises(policy.PolicyDeclined, match="rule personalized_adapters"):
        policy.enforce(strict, cfg, personalize=True)
    tasks = policy.SitePolicy(allowed_tasks=("causal-lm",))
    with pytest.raises(policy.PolicyDeclined, match="rule allowed_tasks: the run's "
                       "task 'classification'"):
        policy.enforce(tasks, cfg)
    local = policy.SitePolicy(allowed_noise=("local",))
    pooled = _cfg(tiny_bert, review_files, privacy={"noise": "distributed"},
                  federation={"secure_aggregation": True, "secagg_threshold": 2})
    with pytest.raises(policy.PolicyDeclined, match="rule allowed_noise: the run "
                       "asks distributed noise .* allows local only"):
        policy.enforce(local, pooled)
    policy.enforce(local, cfg)
    # by name, and DP off with --allow-non-private
    policy.enforce(policy.SitePolicy(allowed_models=(str(tiny_bert),)), cfg)
    off = _cfg(tiny_bert, review_files, privacy={"enabled": False})
    policy.enforce(policy.SitePolicy(allow_non_private=True), off)
    # the planned noise, checked once planned
    with pytest.raises(policy.PolicyDeclined, match="planned noise multiplier 0.4"):
        policy.check_noise(strict, [0.4, 0.0])
    policy.check_noise(strict, [0.9, 0.6])


def test_a_deployed_site_without_a_policy_still_requires_dp() -> None:
    assert policy.of_node({"partition-id": 1}) is None  # simulation
    default = policy.of_node({"data-path": "/x.jsonl"})
    assert default == policy.SitePolicy() and not default.allow_non_private
    assert policy.of_node({"data-path": "/x", "allow-non-private": "true"}
                          ).allow_non_private
    with pytest.raises(policy.PolicyDeclined, match="policy file is gone"):
        policy.of_node({"data-path": "/x", "site-policy": "/no/such/policy.yaml"})


@pytest.mark.usefixtures("flower_identity")
def test_a_declined_run_reads_no_record_and_charges_nothing(
        tmp_path: Path, tiny_bert: Path, review_files: tuple[Path, Path],
        caplog: pytest.LogCaptureFixture) -> None:
    # Prepare: a deployed site with a ledger and a policy capping epsilon at 1
    path = _write(tmp_path, {"max_epsilon_per_run": 1})
    cfg = _cfg(tiny_bert, review_files)
    flat = config.to_run_config(cfg)
    model = build_model(cfg.model, cfg.lora, num_labels=3)
    content = RecordDict({records.ARRAYS: records.to_record(adapter_state(model)),
                          records.CONFIG: ConfigRecord({records.SERVER_ROUND: 1})})
    ledger = tmp_path / "ledger"
    node = {"data-path": str(review_files[0]), "ledger-dir": str(ledger),
            "site-policy": str(path)}
    app = make_client_app(flat)
    loads = site.load_counts()["data_loads"]
    # Execute: the planner's query, a training round and an evaluation
    failures = []
    for kind in ("query", "train", "evaluate"):
        msg = Message(content if kind != "query" else RecordDict({
            records.CONFIG: ConfigRecord({records.QUERY: records.SITE_SIZE})}),
            dst_node_id=7, message_type=kind)
        ctx = Context(run_id=1, node_id=7, node_config=node, state=RecordDict(),
                      run_config={})
        with pytest.raises(policy.PolicyDeclined) as info:
            app(msg, ctx)
        failures.append(str(info.value))
    # Assert: each declined with the rule; no record read, no ledger entry
    assert all("rule max_epsilon_per_run: the run asks epsilon 8, above the "
               "site's 1" in f for f in failures), failures
    assert site.load_counts()["data_loads"] == loads
    assert not list(ledger.glob("*.json"))


def test_the_planned_noise_is_checked_before_anything_is_released(
        tmp_path: Path, tiny_bert: Path, review_files: tuple[Path, Path]) -> None:
    cfg = _cfg(tiny_bert, review_files, train={"logit_adjustment": 1.0})
    book = Book(PrivacyLedger(tmp_path, "f" * 64), Budget(epsilon=50.0))
    picky = policy.SitePolicy(min_noise_multiplier=50.0)
    with pytest.raises(policy.PolicyDeclined, match="rule min_noise_multiplier"):
        privacy.open_round(cfg, num_examples=100, round_=1, labels=lambda: [0] * 100,
                           saved=None, prior=None, book=book,
                           check_noise=lambda s: policy.check_noise(picky, s))
    assert book.ledger.spent(1e-5) == 0.0


def test_the_server_names_the_site_and_the_rule(caplog: pytest.LogCaptureFixture
                                                ) -> None:
    reason = ("<'SitePolicy on the site: rule max_epsilon_per_run: the run asks "
              "epsilon 10, above the site's 8'>")
    assert stats.declined_words(reason) == ("site policy rule max_epsilon_per_run: "
                                            "the run asks epsilon 10, above the "
                                            "site's 8")
    assert stats.declined_words("PrivacyBudgetExhausted on the site") == \
        stats.BUDGET_WORDS
    assert stats.declined_words("DataError on the site") is None
    with caplog.at_level(logging.WARNING):
        err = stats.all_declined(2, stats.RoundStats(
            sampled=1, nodes_declined=["5"],
            declined_why={"5": "site policy rule dp-required: ..."}))
    assert "every site declined (1): site policy rule dp-required" in str(err)
