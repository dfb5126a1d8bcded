"""`softprompt serve MODEL_DIR --ray --replicas N`: the Ray Serve deployment on a local or existing Ray cluster."""

from __future__ import annotations

import argparse
import logging
import os
import time

from ..errors import SoftPromptError
from .cli import API_KEY_ENV, discover_prompts, parse_text_prompts, read_chat_template

APP_NAME = "softprompt"


def settings_from_args(args: argparse.Namespace, replica_gpus: float):
    from .ray_serve import RayServeSettings

    return RayServeSettings(
        model_dir=args.model_dir, prompt_dir=args.prompt_dir,
        prompts={name: str(path) for name, path in discover_prompts(args.prompts)},
        text_prompts=parse_text_prompts(args.text_prompt), replicas=args.replicas, routing=args.routing,
        max_prompts_per_replica=args.max_prompts_per_replica, affinity_imbalance=args.affinity_imbalance,
        device=args.device, dtype=args.dtype,
        backend=args.backend, cuda_graphs=False if args.enforce_eager else None,
        kv_cache_bytes=args.kv_cache_bytes, max_num_seqs=args.max_num_seqs,
        max_batched_tokens=args.max_batched_tokens, max_queue=args.max_queue, replica_cpus=args.replica_cpus,
        replica_gpus=replica_gpus, generation_config=args.generation_config,
        tool_call_parser=args.tool_call_parser, reasoning_parser=args.reasoning_parser,
        enable_prefix_caching=args.enable_prefix_caching, scheduling_policy=args.scheduling_policy,
        api_key=args.api_key or os.environ.get(API_KEY_ENV),
        chat_template=None if args.chat_template is None else read_chat_template(args.chat_template),
        max_model_len=args.max_model_len,
    )


def _replica_gpus(args: argparse.Namespace, cluster_gpus: float) -> float:
    if args.replica_gpus is not None:
        return args.replica_gpus
    if args.device is not None:
        return 1.0 if args.device.startswith("cuda") else 0.0
    return 1.0 if cluster_gpus >= 1 else 0.0


def run_ray_serve(args: argparse.Namespace) -> int:
    try:
        import ray
        from ray import serve
    except ImportError as exc:
        raise SoftPromptError("softprompt serve --ray needs the ray extra: "
                              "pip install 'softprompt-engine[ray]'") from exc
    from .ray_serve import build_app

    local = args.ray_address is None
    if local and args.replicas * args.replica_cpus > (os.cpu_count() or 1):
        raise SoftPromptError(f"{args.replicas} replicas x {args.replica_cpus} CPUs do not fit this machine's "
                              f"{os.cpu_count()} CPUs: lower --replica-cpus (e.g. 0.5) or --replicas")
    ray.init(address=args.ray_address or "local", include_dashboard=False if local else None,
             logging_level=getattr(logging, args.log_level.upper(), logging.INFO))
    try:
        settings = settings_from_args(args, _replica_gpus(args, ray.cluster_resources().get("GPU", 0)))
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(build_app(settings), name=APP_NAME, route_prefix="/")
        print(f"softprompt: {settings.replicas} replica(s), {settings.routing} routing, "
              f"on http://{args.host}:{args.port}/v1 (Ctrl-C stops)", flush=True)
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        if local:
            serve.shutdown()
            ray.shutdown()
        else:
            serve.delete(APP_NAME)
    return 0
