"""The ``rzenembed`` command line.

rzenembed tiny-model OUT [--seed N] [--family F]  write a tiny offline model folder
rzenembed sample-data OUT [--seed N] [--scale K]  write the generated sample corpus
rzenembed config CONFIG.yaml [--set K=V ...]       validate a config, print it resolved
rzenembed embed --model PATH INPUT.jsonl OUT.parquet   embed a file of inputs (resumable)
rzenembed evaluate --model PATH --eval EVALSET OUT/    MMEB-style scores and a report
rzenembed import-mmeb-eval FILE OUT --name N --category C --media-root DIR
rzenembed import-mmeb-v2 ROOT OUT [--release TAG] [--frames 8] [--dataset NAME ...]
rzenembed mmeb-v2-fixture OUT [--broken]           a scaled-down MMEB-V2 release
rzenembed soup ADAPTER... --out DIR [--method M] [--weights W,...] [--eval EVALSET]
rzenembed lineage models:/rzenembed@champion [--tracking-uri URI] [--json]
                  [--format text|json|dot|mermaid|svg]
rzenembed verify models:/rzenembed@champion|FOLDER [--tracking-uri URI] [--json]
rzenembed publish FOLDER URI [--endpoint-url URL]   a model folder onto the storage root
rzenembed inspect-source --format F PATH [--rows N]  a download's first rows, converted
rzenembed serve --config CONFIG.yaml [--model URI] [--no-follow]  the embeddings endpoint
rzenembed api-key new FILE [--label TEXT]          a key for the endpoint (its hash into FILE)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from rzenembed.compact import PRECISIONS
from rzenembed.config import ConfigError, config_digest, load_config, resolve_paths
from rzenembed.modeling.backbones import FAMILIES
from rzenembed.telemetry import telemetry_off


def _cmd_tiny_model(args: argparse.Namespace) -> int:
    from rzenembed.modeling.tiny import build_tiny_model

    out = build_tiny_model(args.out, seed=args.seed, family=args.family)
    print(f"tiny {args.family} model written to {out}")
    return 0


def _cmd_sample_data(args: argparse.Namespace) -> int:
    from rzenembed.data.sample import build_sample_corpus

    corpus = build_sample_corpus(args.out, seed=args.seed, scale=args.scale)
    rows = sum(d.rows for d in corpus.datasets)
    print(
        f"sample corpus written to {corpus.root}: {len(corpus.datasets)} datasets, {rows} rows, "
        f"{len(corpus.eval_sets)} eval sets; sources in {corpus.sources_yaml}"
    )
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)
    print(json.dumps(cfg.model_dump(mode="json"), indent=2))
    print(f"# config digest: {config_digest(cfg)}", file=sys.stderr)
    return 0


def _cmd_embed(args: argparse.Namespace) -> int:
    from rzenembed.embedding import embed_file

    out = embed_file(args.model, args.input, args.out, args.batch_size, args.part_rows)
    print(f"embeddings written to {out}")
    return 0


def _evaluate_to(model: str, evals: list[str], out: str, args: argparse.Namespace) -> dict:
    from rzenembed.evaluation import evaluate, write_report
    from rzenembed.evaluation.published import read_scores_at
    from rzenembed.evaluation.release import suite_skipped
    from rzenembed.modeling import RzenEmbedder
    from rzenembed.modeling.digest import folder_digest
    from rzenembed.runtime import task_device

    references = [read_scores_at(uri) for uri in args.reference]  # a bad path fails first
    embedder = RzenEmbedder.from_pretrained(model, device=task_device(want_gpu=True))
    digest = folder_digest(model)
    variants, trained, calibration = _cli_variants(model, args)
    scores = evaluate(
        embedder,
        evals,
        model_digest=digest,
        cache_dir=args.cache,
        batch_size=args.batch_size,
        datasets=args.dataset,
        show_progress=True,
        variants=variants,
    )
    info = {
        "path": str(Path(model).resolve()),
        "digest": digest,
        "max_visual_tokens": embedder.cfg.max_visual_tokens,
        "trained_dimensions": trained,
        "calibration": calibration,
    }
    skipped = suite_skipped(evals)
    return write_report(
        scores, out, info, previous=args.previous, skipped=skipped, references=references
    )


def _cli_variants(model: str, args: argparse.Namespace) -> tuple:
    """``evaluate``'s compact variants: ``--dimensions`` (default: the card's trained
    sizes), ``--precision`` (default float, int8, binary), int8/uint8 with the calibration
    stored in the model folder (none: not scored); and what the report records of them."""
    from rzenembed.compact import CALIBRATION_FILE, read_calibration, trained_dimensions
    from rzenembed.config import EvalConfig
    from rzenembed.evaluation.runner import Variants
    from rzenembed.modeling.card import ModelCard

    trained = trained_dimensions(ModelCard.load(model).extra)
    dims = trained if args.dimensions is None else args.dimensions
    calibration = read_calibration(model)
    precisions = args.precision or EvalConfig().precisions
    recorded = None
    if calibration is not None:
        recorded = {
            "uri": str(Path(model) / CALIBRATION_FILE),
            "dimensions": calibration.dimensions,
        }
    return Variants(dims, precisions, calibration), trained, recorded


def _dimension_list(text: str) -> list[int]:
    try:
        dims = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of sizes: {text!r}") from None
    if any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError(f"sizes must be > 0: {text!r}")
    return dims


def _cmd_evaluate(args: argparse.Namespace) -> int:
    paths = _evaluate_to(args.model, args.eval, args.out, args)
    report = json.loads(paths["json"].read_text())
    print(f"All: {100 * report['all']['score']:.1f} over {report['all']['datasets']} datasets")
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def _cmd_import_mmeb(args: argparse.Namespace) -> int:
    from rzenembed.evaluation.evalset import import_mmeb_eval, read_mmeb_rows

    rows = read_mmeb_rows(args.file)
    out = import_mmeb_eval(rows, args.name, args.category, args.out, args.media_root)
    print(f"evaluation set {args.name} ({len(rows)} queries) written to {out}")
    return 0


def _cmd_import_mmeb_v2(args: argparse.Namespace) -> int:
    from rzenembed.evaluation.release import import_mmeb_v2

    result = import_mmeb_v2(args.root, args.out, args.release, args.frames, args.dataset)
    for name, meta in result.written.items():
        print(f"  {name}: {meta['queries']} queries, {meta['candidate_count']} candidates")
    for name, entry in result.skipped.items():
        print(f"  SKIPPED {name}: {entry['reason']}")
    print(
        f"{len(result.written)} sets written to {result.out}, {len(result.skipped)} skipped "
        f"(see {result.out / 'suite.json'})"
    )
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from rzenembed.evaluation import comparison
    from rzenembed.evaluation.published import ScoreFileError, read_scores, read_scores_at

    try:
        ours = read_scores(args.ours, name=args.name)
        references = [read_scores_at(uri) for uri in args.published]
    except ScoreFileError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if ours.notes:
        print(f"reading {ours.source}:")
        print("\n".join(f"  {note}" for note in ours.notes))
    found = comparison.compare_all(ours, references)
    print(comparison.to_text(found))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / comparison.COMPARISON_JSON).write_text(json.dumps(found, indent=2) + "\n")
        chart = comparison.plot(found, out / comparison.COMPARISON_PNG)
        markdown = out / comparison.COMPARISON_MD
        markdown.write_text(comparison.to_markdown(found, chart.name))
        print(f"written: {markdown}, {out / comparison.COMPARISON_JSON}, {chart}")
    return 0


def _cmd_mmeb_v2_fixture(args: argparse.Namespace) -> int:
    from rzenembed.evaluation.release_fixture import build_release_fixture

    root = build_release_fixture(args.out, broken=args.broken)
    print(f"scaled-down MMEB-V2 release written to {root}")
    return 0


def _cmd_soup(args: argparse.Namespace) -> int:
    from rzenembed.evaluation import evaluate
    from rzenembed.soup import soup

    score = None
    if args.eval:

        def score(embedder) -> float:
            results = evaluate(embedder, args.eval, batch_size=args.batch_size)
            return sum(r.score for r in results) / len(results)

    weights = [float(w) for w in args.weights.split(",")] if args.weights else None
    result = soup(args.adapters, args.out, args.method, weights, not args.no_normalize, score)
    kept = [a["name"] for a in result.recipe["adapters"] if a["kept"]]
    print(f"souped model ({args.method}, adapters {kept}) written to {result.path}")
    return 0


def _cmd_mine(args: argparse.Namespace) -> int:
    from rzenembed.data.version import DatasetVersion
    from rzenembed.mining.mine import local_judge, mine_version
    from rzenembed.mining.report import one_line
    from rzenembed.modeling import RzenEmbedder
    from rzenembed.modeling.digest import folder_digest
    from rzenembed.runtime import task_device

    cfg = resolve_paths(load_config(args.config, [*args.set, f"model.name_or_path={args.model}"]))
    version = DatasetVersion.open(args.version, cfg.storage.endpoint_url)
    model = {"uri": str(Path(args.model).resolve()), "digest": folder_digest(args.model)}

    def embedder() -> RzenEmbedder:
        device = task_device(want_gpu=True)
        return RzenEmbedder.from_pretrained(args.model, config=cfg.model, device=device)

    judge = local_judge(cfg) if cfg.mining.judge.enabled else None
    mined = mine_version(cfg, version, embedder, model, judge=judge)
    print(one_line(mined.report) + ("  (found already mined)" if mined.reused else ""))
    print(f"mined version: {mined.version.uri}")
    print(f"report: {mined.version.uri.rstrip('/')}/report/mining.md")
    return 0


def _cmd_lineage(args: argparse.Namespace) -> int:
    from rzenembed.config import TrackingConfig
    from rzenembed.tracking import Tracker, lineage, raw_sources, render

    tracker = Tracker(TrackingConfig(tracking_uri=args.tracking_uri))
    tree = lineage(tracker, args.model_uri)
    fmt = "json" if args.json else args.format
    if fmt == "json":
        print(json.dumps(_tree_json(tree), indent=2))
    elif fmt == "svg":
        from rzenembed.lineage_graph import to_svg

        print(to_svg(tree, f"{args.model_uri}: lineage"), end="")
    elif fmt in ("dot", "mermaid"):
        from rzenembed.lineage_graph import to_dot, to_mermaid

        print((to_dot if fmt == "dot" else to_mermaid)(tree), end="")
    else:
        print(render(tree))
        print(f"# {len(raw_sources(tree))} raw sources reached")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from rzenembed.config import TrackingConfig
    from rzenembed.tracking import Tracker
    from rzenembed.verify import render, verify

    tracker = Tracker(TrackingConfig(tracking_uri=args.tracking_uri))
    endpoint = args.endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
    result = verify(tracker, args.target, endpoint_url=endpoint, jobs=args.jobs)
    counts = result.counts
    if args.json:
        print(
            json.dumps({"ok": result.ok, "counts": counts, "tree": result.root.to_json()}, indent=2)
        )
    else:
        print(render(result.root))
        summary = ", ".join(f"{n} {status}" for status, n in counts.items())
        print(f"# {sum(counts.values())} nodes: {summary}")
    for node in result.failures():
        print(
            f"{node.check.status}: {node.ref.kind} {node.ref.name} at {node.ref.uri}: "
            f"{node.check.detail or 'digest differs'}",
            file=sys.stderr,
        )
    return 0 if result.ok else 1


def _cmd_publish(args: argparse.Namespace) -> int:
    from rzenembed.data.folders import publish_folder
    from rzenembed.modeling.digest import digests_of

    folder = Path(args.folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder not found: {folder}")
    digests = digests_of(folder)
    endpoint = args.endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
    marker = publish_folder(folder, args.uri, endpoint, **digests)
    short = {k: v[:12] for k, v in digests.items()}
    print(
        f"published {len(marker['files'])} files to {args.uri} "
        f"(digest {short['digest']}, weights {short['weights_digest']})"
    )
    return 0


def _cmd_inspect_source(args: argparse.Namespace) -> int:
    from rzenembed.data.inspect import inspect_source

    endpoint = args.endpoint_url or os.environ.get("AWS_ENDPOINT_URL")
    report = inspect_source(args.path, args.format, args.rows, endpoint)
    print(f"# {args.path}: {report.rows_read} rows read as {args.format!r}")
    if report.not_data:
        more = ", ..." if report.not_data > len(report.not_data_names) else ""
        print(
            f"# not data for {args.format!r}, ignored: {report.not_data} files "
            f"({', '.join(report.not_data_names)}{more})"
        )
    for record in report.records:
        print(json.dumps(record, ensure_ascii=False, default=str))
    print(f"# {len(report.records)} records, {sum(report.rejects.values())} rejects")
    for reason, count in sorted(report.rejects.items()):
        print(f"#   reject {reason} x{count}: {report.examples[reason]}")
    missing = [path for path, found in report.media if not found]
    print(f"# media read from the folder: {len(report.media)}, missing: {len(missing)}")
    for path in missing:
        print(f"#   missing {path}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import threading

    from rzenembed.compute.connect import ensure_ray
    from rzenembed.serving.follow import RegistryFollower
    from rzenembed.serving.source import default_model_uri
    from rzenembed.tracking import with_environment_tracking

    cfg = with_environment_tracking(resolve_paths(load_config(args.config, args.set)))
    uri = args.model or default_model_uri(cfg)
    ensure_ray(cfg.compute.ray_address)
    follower = RegistryFollower(cfg, uri)
    rollout = follower.start()
    base = f"http://{cfg.serve.host}:{cfg.serve.port}{cfg.serve.route_prefix.rstrip('/')}"
    print(
        f"serving {follower.served.label} (digest {rollout.digest[:12]}) at "
        f"{base}/v1/embeddings; models: {base}/v1/models",
        flush=True,
    )
    if args.no_follow:
        return 0
    print(f"following {uri} every {cfg.serve.poll_interval_s:g} s (Ctrl-C stops)", flush=True)
    stop = threading.Event()
    try:
        follower.follow(stop)
    except KeyboardInterrupt:
        stop.set()
    return 0


def _tree_json(node) -> dict:
    return {
        **node.ref.to_json(),
        "step": node.step,
        "seen_before": node.seen_before,
        "inputs": [_tree_json(c) for c in node.children],
    }


def _tracking_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tracking-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///runs/mlflow.db"),
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or the local demo store)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rzenembed", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    tiny = sub.add_parser("tiny-model", help="write a tiny offline model folder (any family)")
    tiny.add_argument("out", help="output folder")
    tiny.add_argument("--seed", type=int, default=0, help="weight/tokenizer seed (default 0)")
    tiny.add_argument("--family", choices=FAMILIES, default="qwen2-vl", help="backbone family")
    tiny.set_defaults(func=_cmd_tiny_model)

    sample = sub.add_parser("sample-data", help="write the generated sample corpus")
    sample.add_argument("out", help="output folder")
    sample.add_argument("--seed", type=int, default=0, help="generation seed (default 0)")
    sample.add_argument(
        "--scale", type=int, default=1, help="multiply the image datasets' rows (default 1)"
    )
    sample.set_defaults(func=_cmd_sample_data)

    config = sub.add_parser("config", help="validate a config and print it fully resolved")
    config.add_argument("config", help="YAML config file")
    config.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override"
    )
    config.set_defaults(func=_cmd_config)

    embed = sub.add_parser("embed", help="embed a JSONL file of inputs into Parquet")
    embed.add_argument("--model", required=True, help="model or adapter folder")
    embed.add_argument("input", help="JSONL: id, text, instruction, image(s), video, frames")
    embed.add_argument("out", help="output Parquet file (id, embedding)")
    embed.add_argument("--batch-size", type=int, default=16)
    embed.add_argument("--part-rows", type=int, default=1024, help="rows per resumable part")
    embed.set_defaults(func=_cmd_embed)

    ev = sub.add_parser("evaluate", help="score a model on evaluation sets, write a report")
    ev.add_argument("--model", required=True, help="model or adapter folder")
    ev.add_argument("--eval", required=True, action="append", help="eval set or folder of sets")
    ev.add_argument("out", help="report folder (report.json, report.md, report.png)")
    ev.add_argument("--previous", help="an earlier report.json: adds a delta column")
    ev.add_argument("--dataset", action="append", default=[], help="only these datasets")
    ev.add_argument(
        "--reference",
        action="append",
        default=[],
        help="a published MMEB-V2 score file to put the model beside (repeatable)",
    )
    ev.add_argument(
        "--dimensions",
        type=_dimension_list,
        help="nested sizes to score besides the full one, e.g. 64,256 (default: the sizes "
        "the model card says it was trained for)",
    )
    ev.add_argument(
        "--precision",
        action="append",
        choices=PRECISIONS,
        help="precisions to score at every size (repeatable; default float, int8, binary; "
        "int8/uint8 need the model's quantization.json)",
    )
    ev.add_argument("--batch-size", type=int, default=16)
    ev.add_argument(
        "--cache",
        default=str(Path.home() / ".cache" / "rzenembed" / "candidates"),
        help="candidate-embedding cache folder (keyed by model digest)",
    )
    ev.set_defaults(func=_cmd_evaluate)

    mmeb = sub.add_parser("import-mmeb-eval", help="convert an MMEB eval file to an eval set")
    mmeb.add_argument("file", help="MMEB (VLM2Vec) eval rows: .jsonl or .parquet")
    mmeb.add_argument("out", help="evaluation set folder to write")
    mmeb.add_argument("--name", required=True, help="dataset name, e.g. ImageNet-1K")
    mmeb.add_argument("--category", required=True, help="e.g. image_classification")
    mmeb.add_argument("--media-root", required=True, help="folder the image paths start from")
    mmeb.set_defaults(func=_cmd_import_mmeb)

    v2 = sub.add_parser("import-mmeb-v2", help="the MMEB-V2 release -> 78 evaluation sets")
    v2.add_argument("root", help="the release folder (media and annotations/)")
    v2.add_argument("out", help="folder to write one set per dataset and suite.json into")
    v2.add_argument("--release", default="unnamed", help="the release tag, e.g. v2.1")
    v2.add_argument("--frames", type=int, default=8, help="frames per video (benchmark: 8)")
    v2.add_argument("--dataset", action="append", default=[], help="only these (repeatable)")
    v2.set_defaults(func=_cmd_import_mmeb_v2)

    cmp = sub.add_parser("compare", help="put an evaluation beside published MMEB-V2 score files")
    cmp.add_argument("ours", help="a report.json (or its folder) or a leaderboard.json")
    cmp.add_argument("published", nargs="+", help="published score files (paths or s3:// URIs)")
    cmp.add_argument("--name", help="what to call our model (default: from the report)")
    cmp.add_argument("--out", help="also write comparison.md, .json and .png here")
    cmp.set_defaults(func=_cmd_compare)

    mine = sub.add_parser("mine", help="mine hard negatives for one dataset version with one model")
    mine.add_argument("version", help="a committed dataset version (its folder or s3:// URI)")
    mine.add_argument("--model", required=True, help="the (merged stage-1) model folder")
    mine.add_argument("--config", default="configs/tiny.yaml", help="storage, mining rules")
    mine.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    mine.set_defaults(func=_cmd_mine)

    fx = sub.add_parser("mmeb-v2-fixture", help="write a scaled-down MMEB-V2 release")
    fx.add_argument("out")
    fx.add_argument("--broken", action="store_true", help="add two datasets with missing parts")
    fx.set_defaults(func=_cmd_mmeb_v2_fixture)

    sp = sub.add_parser("soup", help="combine stage-2 LoRA adapters into one merged model")
    sp.add_argument("adapters", nargs="+", help="adapter folders (same base model)")
    sp.add_argument("--out", required=True, help="merged model folder to write")
    sp.add_argument("--method", choices=["delta", "factors", "greedy"], default="delta")
    sp.add_argument("--weights", help="comma-separated, one per adapter (default uniform)")
    sp.add_argument("--no-normalize", action="store_true", help="use the weights as given")
    sp.add_argument("--eval", action="append", default=[], help="held-out sets (greedy)")
    sp.add_argument("--batch-size", type=int, default=16)
    sp.set_defaults(func=_cmd_soup)

    lin = sub.add_parser("lineage", help="walk a registered model back to its raw datasets")
    lin.add_argument("model_uri", help="models:/NAME/VERSION or models:/NAME@ALIAS")
    _tracking_option(lin)
    lin.add_argument("--json", action="store_true", help="print the tree as JSON")
    lin.add_argument(
        "--format",
        choices=["text", "json", "dot", "mermaid", "svg"],
        default="text",
        help="text tree (default), JSON, or a graph: Graphviz DOT, Mermaid, a standalone SVG",
    )
    lin.set_defaults(func=_cmd_lineage)

    ver = sub.add_parser(
        "verify", help="recompute every digest on a model's lineage; non-zero exit on a mismatch"
    )
    ver.add_argument("target", help="models:/NAME/VERSION, models:/NAME@ALIAS or a model folder")
    _tracking_option(ver)
    ver.add_argument("--endpoint-url", help="S3 endpoint (default: $AWS_ENDPOINT_URL)")
    ver.add_argument("--jobs", type=int, default=8, help="shards hashed at once (default 8)")
    ver.add_argument("--json", action="store_true", help="print the checked tree as JSON")
    ver.set_defaults(func=_cmd_verify)

    pub = sub.add_parser(
        "publish", help="copy a model folder onto the storage root with its commit marker"
    )
    pub.add_argument("folder", help="local model folder (e.g. Qwen2-VL-2B-Instruct)")
    pub.add_argument("uri", help="target URI, e.g. s3://bucket/models/Qwen2-VL-2B-Instruct")
    pub.add_argument("--endpoint-url", help="S3 endpoint (default: $AWS_ENDPOINT_URL)")
    pub.set_defaults(func=_cmd_publish)

    ins = sub.add_parser(
        "inspect-source", help="convert a download's first rows with a format; writes nothing"
    )
    ins.add_argument("path", help="the source folder (local or s3://)")
    ins.add_argument("--format", required=True, help="a sources[].format name")
    ins.add_argument("--rows", type=int, default=5, help="raw rows to read (default 5)")
    ins.add_argument("--endpoint-url", help="S3 endpoint (default: $AWS_ENDPOINT_URL)")
    ins.set_defaults(func=_cmd_inspect_source)
    _serve_parser(sub)
    _api_key_parser(sub)
    return parser


def _cmd_api_key(args: argparse.Namespace) -> int:
    from rzenembed.serving.auth import new_key

    key = new_key(args.file, args.label)
    print(key)
    print(
        f"# its SHA-256 was appended to {args.file}; the key is shown only now. Clients send "
        "Authorization: Bearer <key> (the OpenAI SDK: api_key=...)",
        file=sys.stderr,
    )
    return 0


def _api_key_parser(sub) -> None:
    keys = sub.add_parser("api-key", help="API keys of the embeddings endpoint")
    actions = keys.add_subparsers(dest="action", required=True)
    new = actions.add_parser("new", help="make a key: print it, append its hash to FILE")
    new.add_argument("file", help="the keys file (serve.api_keys_file)")
    new.add_argument("--label", default="", help="a comment line above the hash (who it is for)")
    new.set_defaults(func=_cmd_api_key)


def _serve_parser(sub) -> None:
    srv = sub.add_parser(
        "serve", help="serve a registered model on Ray Serve (POST /v1/embeddings)"
    )
    srv.add_argument("--config", required=True, help="pipeline config (tracking, storage, serve)")
    srv.add_argument(
        "--model",
        default=None,
        help="models:/NAME@ALIAS, models:/NAME/VERSION or a model folder "
        "(default: serve.model_uri, else models:/<registered_model>@champion)",
    )
    srv.add_argument("--set", action="append", default=[], help="config override K=V")
    srv.add_argument(
        "--no-follow",
        action="store_true",
        help="deploy and return (a cluster keeps serving) instead of following the alias",
    )
    srv.set_defaults(func=_cmd_serve)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    telemetry_off()  # before any command starts Ray, Serve or an MLflow client
    try:
        return args.func(args)
    except (ConfigError, ValueError, FileNotFoundError, FileExistsError) as exc:
        # ModelFolderError, EmbedJobError, EvalSetError, SoupError, MediaError derive from these
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
