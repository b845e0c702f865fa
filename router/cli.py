"""`spillover serve | check | demo-model`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from pathlib import Path

from router.config import Config, ConfigError, config_path, load_config
from serving.engine import EngineSpec

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

    check = sub.add_parser("check", help="validate models.yaml and print every problem")
    check.add_argument("--config")

    demo = sub.add_parser("demo-model", help="write the tiny demo Mistral model into DIR")
    demo.add_argument("dir", type=Path)

    args = parser.parse_args(argv)
    if args.command == "check":
        return _check(args.config)
    if args.command == "demo-model":
        from serving.demo_model import build_demo_model

        out = build_demo_model(args.dir)
        print(f"demo model ready in {out}")
        return 0
    return _serve(args)


def _check(explicit: str | None) -> int:
    path = config_path(explicit)
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        print(f"{path}: {len(exc.problems)} problem(s)", file=sys.stderr)
        for p in exc.problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    n_local = sum(len(a.local) for a in cfg.aliases.values())
    n_hosted = sum(len(a.hosted) for a in cfg.aliases.values())
    print(f"{path}: ok ({len(cfg.aliases)} aliases, {n_local} local deployments, "
          f"{n_hosted} hosted offerings, {len(cfg.providers)} providers)")
    return 0


def _serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    path = config_path(args.config)
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        for p in exc.problems:
            print(f"{path}: {p}", file=sys.stderr)
        return 1
    # uvicorn turns Ctrl-C into a clean shutdown; a second one may still land here.
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_run(cfg, path, args))
    return 0


async def _run(cfg: Config, path: str, args: argparse.Namespace) -> None:
    import uvicorn

    from router.app import Settings, create_app
    from serving.engine import EngineSupervisor

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
    app = create_app(Settings(config_path=path), config=cfg)
    server = uvicorn.Server(uvicorn.Config(
        app, host=args.host or cfg.server.host, port=args.port or cfg.server.port,
        log_level=args.log_level.lower(), access_log=False, lifespan="on",
        timeout_graceful_shutdown=10,
    ))
    try:
        await server.serve()
    finally:
        if supervisor is not None:
            await supervisor.stop_all()


def engine_specs(cfg: Config) -> list[EngineSpec]:
    return [
        EngineSpec(
            name=dep.name,
            model=dep.model,
            served_model_name=dep.model_id(alias),
            host=dep.host,
            port=dep.port,
            max_model_len=dep.max_model_len,
            gpu_memory_utilization=dep.gpu_memory_utilization,
            tensor_parallel_size=dep.tensor_parallel_size,
            extra_args=tuple(dep.extra_args),
            env=tuple(sorted(dep.env.items())),
        )
        for alias, dep in cfg.deployments()
        if dep.managed
    ]


if __name__ == "__main__":
    raise SystemExit(main())
