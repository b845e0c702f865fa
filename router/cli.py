"""`spillover serve | check | demo-model | keys add | usage`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from router.config import (
    RESERVED_CALLER_NAMES,
    Config,
    ConfigError,
    config_path,
    load_config,
    model_path_problems,
)
from serving.engine import EngineSpec, EngineSupervisor, deployment_spec

log = logging.getLogger("spillover")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="spillover", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start the managed engines and the router")
    serve.add_argument("--config", help="models.yaml (default: $SPILLOVER_CONFIG or models.yaml)")
    serve.add_argument("--no-engines", action="store_true",
                       help="only the router; engines run elsewhere at their base_url")
    serve.add_argument("--host", help="override server.host")
    serve.add_argument("--port", type=int, help="override server.port")
    serve.add_argument("--log-level", default=os.environ.get("SPILLOVER_LOG_LEVEL", "info"))
    serve.add_argument("--allow-open-reload", action="store_true",
                       help="let a SIGHUP reload remove every caller or the admin key "
                            "(refused otherwise: a truncated file must not open the gateway)")

    check = sub.add_parser("check", help="validate models.yaml and print every problem")
    check.add_argument("--config")

    demo = sub.add_parser("demo-model", help="write the tiny demo Mistral model into DIR")
    demo.add_argument("dir", type=Path)

    keys = sub.add_parser("keys", help="API keys for callers")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    add = keys_sub.add_parser("add", help="print a new key for caller NAME, once")
    add.add_argument("name")

    usage = sub.add_parser("usage", help="usage and cost from the ledger, as a table")
    usage.add_argument("--config")
    usage.add_argument("--since", help="unix seconds or ISO date (default: today, UTC)")
    usage.add_argument("--until", help="unix seconds or ISO date (default: now)")
    usage.add_argument("--group-by", default="caller",
                       help="comma-separated: caller, alias, route, backend, day")
    usage.add_argument("--caller", help="only this caller")
    usage.add_argument("--csv", action="store_true", help="CSV instead of a table")

    tiers = sub.add_parser("tiers", help="tiered aliases")
    tiers_sub = tiers.add_subparsers(dest="tiers_command", required=True)
    cal = tiers_sub.add_parser(
        "calibrate", help="the top threshold that would have escalated a target share of "
        "recent requests (scores from the ledger, or --from a JSONL file of bodies)")
    cal.add_argument("--config", default=None)
    cal.add_argument("--alias", default=None, help="the tiered alias (default: the only one)")
    cal.add_argument("--target-share", type=float, required=True,
                     help="the share of requests to send to the top tier, e.g. 0.2")
    cal.add_argument("--days", type=float, default=7.0, help="ledger rows this recent")
    cal.add_argument("--from", dest="source", default=None, metavar="FILE.jsonl",
                     help="score these request bodies instead of reading the ledger")

    deploy = sub.add_parser("deploy", help="render deployment manifests from models.yaml")
    deploy_sub = deploy.add_subparsers(dest="deploy_target", required=True)
    k8s = deploy_sub.add_parser("k8s", help="Kubernetes manifests (README: Deploying on "
                                "Kubernetes)")
    k8s.add_argument("--config")
    k8s.add_argument("--out", type=Path, required=True, help="directory for the manifests")
    k8s.add_argument("--namespace", default="spillover")
    k8s.add_argument("--router-image", default="spillover-router:latest",
                     help="the image built from Dockerfile.router")
    k8s.add_argument("--router-replicas", type=int, default=2)
    k8s.add_argument("--model-pvc", help="PersistentVolumeClaim holding the models "
                     "(default: a directory on each GPU node, --model-host-path)")
    k8s.add_argument("--model-host-path", default="/var/lib/spillover/models")
    k8s.add_argument("--providers-secret", default="spillover-providers",
                     help="Secret with one key per provider api_key_env")
    k8s.add_argument("--database-secret", default="spillover-database",
                     help="Secret whose key `url` is the shared PostgreSQL URL")
    k8s.add_argument("--no-database", action="store_true",
                     help="each router replica keeps its own SQLite ledger (budgets not shared)")
    k8s.add_argument("--service-monitor", action="store_true",
                     help="also a Prometheus Operator ServiceMonitor for the routers")
    k8s.add_argument("--metrics-secret", default="spillover-metrics",
                     help="Secret whose key `token` Prometheus sends to /metrics")

    args = parser.parse_args(argv)
    if args.command == "deploy":
        return _deploy_k8s(args)
    if args.command == "check":
        return _check(args.config)
    if args.command == "keys":
        return _keys_add(args.name)
    if args.command == "usage":
        return _usage(args)
    if args.command == "tiers":
        return _calibrate(args)
    if args.command == "demo-model":
        from serving.demo_model import build_demo_model

        out = build_demo_model(args.dir)
        print(f"demo model ready in {out}")
        return 0
    return _serve(args)


def _load(explicit: str | None) -> tuple[str, Config | None]:
    """models.yaml, validated with the database setting; None after printing every problem."""
    path = config_path(explicit)
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        print(f"{path}: {len(exc.problems)} problem(s)", file=sys.stderr)
        for p in exc.problems:
            print(f"  {p}", file=sys.stderr)
        return path, None
    if (db_problem := _database_problem(cfg)) is not None:
        print(f"{path}: {db_problem}", file=sys.stderr)
        return path, None
    return path, cfg


def _check(explicit: str | None) -> int:
    path, cfg = _load(explicit)
    if cfg is None or not _models_exist(path, cfg):
        return 1
    n_local = sum(len(a.local) for a in cfg.aliases.values())
    n_hosted = sum(len(a.hosted) for a in cfg.aliases.values())
    print(f"{path}: ok ({len(cfg.aliases)} aliases, {n_local} local deployments, "
          f"{n_hosted} hosted offerings, {len(cfg.providers)} providers)")
    return 0


def _models_exist(path: str, cfg: Config) -> bool:
    """Every managed engine's model, where it is a local path, holds a model; else print
    each problem with its line. A typo here would otherwise surface as an engine that
    restarts until someone reads its log."""
    problems = model_path_problems(cfg, path)
    if problems:
        print(f"{path}: {len(problems)} problem(s)", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
    return not problems


def _database_problem(cfg: Config) -> str | None:
    """What is wrong with the PostgreSQL setting, checked before anything starts."""
    from router.accounting.pg import PgConfigError
    from router.accounting.storage import database_target

    try:
        database_target(cfg.server, os.environ)
    except PgConfigError as exc:
        return str(exc)
    return None


def _deploy_k8s(args: argparse.Namespace) -> int:
    import yaml

    from serving.k8s import K8sOptions, RenderError, render, write_manifests

    path, cfg = _load(args.config)
    if cfg is None:
        return 1
    opts = K8sOptions(
        namespace=args.namespace, router_image=args.router_image,
        router_replicas=args.router_replicas, model_pvc=args.model_pvc,
        model_host_path=args.model_host_path, providers_secret=args.providers_secret,
        database_secret=None if args.no_database else args.database_secret,
        service_monitor=args.service_monitor, metrics_secret=args.metrics_secret)
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        written = write_manifests(render(cfg, raw, opts), args.out)
    except RenderError as exc:
        print(f"{path}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"cannot write {args.out}: {exc.strerror}", file=sys.stderr)
        return 1
    print(f"{len(written)} manifests in {args.out}; apply with: kubectl apply -f {args.out}")
    return 0


def _keys_add(name: str) -> int:
    from router.routing.auth import new_key

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:-]*", name):
        print(f"not a valid caller name: {name!r}", file=sys.stderr)
        return 2
    if name.casefold() in RESERVED_CALLER_NAMES:
        print(f"the caller name {name!r} is reserved; choose another", file=sys.stderr)
        return 2
    key, digest = new_key()
    print(f"API key for {name} (shown once; give it to the caller, it is not stored):\n")
    print(f"  {key}\n")
    print("Add its digest to models.yaml (only the digest is kept), then reload:\n")
    print(f"callers:\n  {name}:\n    key_sha256:\n      - {digest}")
    return 0


def _usage(args: argparse.Namespace) -> int:
    from router.accounting.ledger import LedgerError
    from router.accounting.storage import open_ledger
    from router.accounting.usage import query, report, to_csv, to_table
    from router.errors import SpilloverError

    _, cfg = _load(args.config)
    if cfg is None:
        return 1
    shared = cfg.server.database_url_env is not None
    ledger_path = cfg.server.ledger_path
    if not shared and ledger_path != ":memory:" and not Path(ledger_path).exists():
        print(f"no ledger at {ledger_path} yet: nothing has been served", file=sys.stderr)
        return 1
    try:
        q = query(args.since, args.until, args.group_by, args.caller)
    except SpilloverError as exc:
        print(exc.message, file=sys.stderr)
        return 2
    try:
        ledger = open_ledger(cfg.server, os.environ)
    except LedgerError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    try:
        rows = report(ledger, q)
    finally:
        ledger.close()
    print(to_csv(rows, q.group_by) if args.csv else to_table(rows, q.group_by))
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    import time

    from router.accounting.ledger import LedgerError
    from router.accounting.storage import open_ledger
    from router.routing.calibrate import calibrate, from_bodies, from_ledger, render

    _, cfg = _load(args.config)
    if cfg is None:
        return 1
    tiered = [n for n, a in cfg.aliases.items() if a.tiers is not None]
    alias = args.alias or (tiered[0] if len(tiered) == 1 else None)
    if alias not in tiered:
        print(f"name a tiered alias with --alias ({', '.join(tiered) or 'none in the config'})",
              file=sys.stderr)
        return 2
    if not 0 < args.target_share < 1:
        print("--target-share must be between 0 and 1", file=sys.stderr)
        return 2
    tiers = cfg.aliases[alias].tiers or []
    if args.source is not None:
        try:
            with open(args.source, "rb") as f:
                samples, skipped = from_bodies(f, cfg, alias)
        except OSError as exc:
            print(f"cannot read {args.source}: {exc.strerror}", file=sys.stderr)
            return 1
        source = args.source + (f" ({skipped} lines skipped: not chat bodies)"
                                if skipped else "")
    else:
        try:
            ledger = open_ledger(cfg.server, os.environ)
        except LedgerError as exc:
            print(str(exc), file=sys.stderr)
            return 1
        try:
            now = time.time()
            rows = ledger.rows(since=now - args.days * 86400, until=now + 1, limit=1_000_000)
        finally:
            ledger.close()
        samples = from_ledger(rows, tiers)
        source = f"the ledger's last {args.days:g} days"
    if not samples:
        print(f"no scored requests of {alias} in {source}", file=sys.stderr)
        return 1
    print(render(calibrate(cfg, alias, samples, args.target_share), args.target_share, source))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from router.accounting.ledger import LedgerError

    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # One access line per request is ours to write; httpx would add one per upstream call.
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    path, cfg = _load(args.config)
    if cfg is None or (not args.no_engines and not _models_exist(path, cfg)):
        return 1
    # uvicorn turns Ctrl-C into a clean shutdown; a second one may still land here.
    try:
        with contextlib.suppress(KeyboardInterrupt), asyncio.Runner(
                loop_factory=_fast_loop()) as runner:
            runner.run(_run(cfg, path, args))
    except LedgerError as exc:  # the ledger's database is unreachable or unwritable
        print(f"{path}: the ledger cannot be opened: {exc}", file=sys.stderr)
        return 1
    return 0


def _fast_loop() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop (from uvicorn[standard]) where it exists: it costs the router less CPU per
    proxied request than asyncio's default loop (docs/performance.md)."""
    try:
        import uvloop
    except ImportError:  # Windows
        return None
    return uvloop.new_event_loop


async def _run(cfg: Config, path: str, args: argparse.Namespace) -> None:
    import uvicorn

    from router.app import Settings, create_app
    from router.errors import SpilloverError
    from router.http.server import server_config

    # The app first: a database that cannot be reached fails here, before any engine runs.
    app = create_app(Settings(config_path=path), config=cfg)
    supervisor: EngineSupervisor | None = None
    if not args.no_engines:
        specs = engine_specs(cfg)
        if specs:
            supervisor = EngineSupervisor(specs, log_dir=Path(cfg.server.log_dir))
            # The router serves at once (hosted) while the engines warm up in the background.
            await supervisor.start_all(wait_ready=False, timeout=cfg.server.engine_start_timeout_s)
            for s in specs:
                log.info("engine %s starting on port %d (log: %s/%s.log)", s.name, s.port,
                         cfg.server.log_dir, s.name)
    runtime = app.state.runtime
    runtime.supervisor = supervisor
    reloads: set[asyncio.Task[object]] = set()

    async def reload() -> None:
        # Runtime.reload serialises overlapping reloads (a burst of SIGHUPs) itself.
        try:
            await runtime.reload(allow_open=args.allow_open_reload)
        except ConfigError as exc:
            for p in exc.problems:
                log.error("reload refused, the running config stays: %s: %s", path, p)
        except SpilloverError as exc:
            log.error("reload refused, the running config stays: %s: %s", path, exc.message)

    def on_sighup() -> None:
        task: asyncio.Task[object] = asyncio.ensure_future(reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    with contextlib.suppress(NotImplementedError):  # no SIGHUP on Windows
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, on_sighup)
    server = uvicorn.Server(server_config(
        app, cfg.server, host=args.host or cfg.server.host, port=args.port or cfg.server.port,
        log_level=args.log_level.lower()))
    try:
        await server.serve()
    finally:
        if supervisor is not None:
            await _stop_engines(supervisor)


async def _stop_engines(supervisor: EngineSupervisor) -> None:
    """Stop every engine even if this task is cancelled meanwhile: after Ctrl-C, uvicorn
    re-raises SIGINT and asyncio cancels the main task, which must not leave engines
    running without a parent."""
    stopping = asyncio.ensure_future(supervisor.stop_all())
    cancelled = False
    while not stopping.done():
        try:
            await asyncio.shield(stopping)
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError


def engine_specs(cfg: Config) -> list[EngineSpec]:
    return [deployment_spec(alias, dep) for alias, dep in cfg.deployments() if dep.managed]


if __name__ == "__main__":
    raise SystemExit(main())
