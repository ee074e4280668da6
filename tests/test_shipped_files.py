"""The files kdtune ships for users: search specs, cluster examples and their docs.

Nothing here starts Ray or trains anything. The checks are the ones a user would
otherwise find out about on a cluster, an hour in: a spec that does not validate,
a command that the CLI rejects, a manifest that names another image, a token
setting that turns authentication off, a volume that the data root is not on.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
from pathlib import Path
from typing import Any, Iterator

import click
import pytest
import yaml

from kdtune.cli import main
from kdtune.errors import KdtuneError
from kdtune.models import build_model, count_parameters
from kdtune.search import plan_placement, preflight
from kdtune.spec import Choice, SearchSpec, load_spec, parse_spec, possible_values
from tests.conftest import REPO

SPECS = sorted((REPO / "search_spaces").glob("*.yaml"))
CLUSTER = REPO / "cluster"
RAYJOB = CLUSTER / "rayjob.yaml"
RAY_CLUSTER = CLUSTER / "ray-cluster.yaml"
DOCKERFILE = CLUSTER / "Dockerfile"
DOCS = [REPO / "docs" / "cluster.md", CLUSTER / "README.md"]

# The python-version CIFAR archives unpack to these files (the layout torchvision and
# the original tarballs use); a folder holding them is a valid data.root.
CIFAR_FILES = {
    "cifar10": [f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)] + ["cifar-10-batches-py/test_batch"],
    "cifar100": ["cifar-100-python/train", "cifar-100-python/test"],
}
IMAGE_SHAPE = {"digits": (1, 8, 8), "cifar10": (3, 32, 32), "cifar100": (3, 32, 32), "fashion_mnist": (1, 28, 28)}
NUM_CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100, "fashion_mnist": 10}
SHELL_OPERATORS = {"&&", "||", ";", "|", "&", ">", ">>", "<"}


def _spec_id(path: Path) -> str:
    return path.stem


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


# --------------------------------------------------------------------------- specs


def test_the_documented_specs_are_shipped():
    names = {p.name for p in SPECS}
    assert {"digits.yaml", "digits_cnn.yaml", "cifar10_resnet.yaml", "cifar100_resnet.yaml"} <= names


@pytest.mark.parametrize("path", SPECS, ids=_spec_id)
def test_every_shipped_spec_validates(path: Path):
    spec = load_spec(path)
    assert isinstance(spec, SearchSpec)
    assert spec.space.searched(), "a shipped spec must search something"


def test_shipped_specs_write_to_different_study_folders():
    studies = [load_spec(p).study for p in SPECS]
    assert len(studies) == len(set(studies)), f"two specs share a study name: {studies}"


@pytest.mark.parametrize("path", [p for p in SPECS if load_spec(p).data.dataset == "digits"], ids=_spec_id)
def test_digits_specs_pass_preflight(path: Path):
    preflight(load_spec(path), str(path))


@pytest.mark.parametrize("path", [p for p in SPECS if load_spec(p).data.dataset == "fashion_mnist"], ids=_spec_id)
def test_fashion_mnist_spec_passes_preflight_on_the_real_files(path: Path):
    spec = load_spec(path)
    if not (Path(spec.data.root) / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"real Fashion-MNIST not at {spec.data.root}: apt-get install dataset-fashion-mnist")
    preflight(spec, str(path))


CIFAR_SPECS = [p for p in SPECS if load_spec(p).data.dataset in CIFAR_FILES]


def test_both_cifar_specs_are_found():
    assert {p.name for p in CIFAR_SPECS} == {"cifar10_resnet.yaml", "cifar100_resnet.yaml"}


@pytest.mark.parametrize("path", CIFAR_SPECS, ids=_spec_id)
def test_cifar_specs_fail_preflight_only_for_the_placeholder_data_root(path: Path, tmp_path: Path):
    spec = load_spec(path)
    placeholder = Path(spec.data.root)
    required = CIFAR_FILES[spec.data.dataset]
    if all((placeholder / name).is_file() for name in required):
        pytest.skip(f"this machine has {spec.data.dataset} at the placeholder {placeholder}")

    with pytest.raises(KdtuneError) as raised:
        preflight(spec, str(path))
    assert "data.root" in str(raised.value)
    assert str(placeholder) in str(raised.value)

    # The same spec with a root that holds the dataset's files passes: nothing else
    # in it (models, options, ranges, teacher) is wrong.
    for name in required:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    raw = spec.model_dump(mode="json")
    raw["data"]["root"] = str(tmp_path)
    preflight(parse_spec(raw, str(path)), str(path))


def _width_comment_numbers(path: Path) -> list[tuple[float, str]]:
    """Parameter counts written in the comment of the spec's `width:` line, e.g.
    "# 17k / 68k / 152k / 270k parameters" or "# 1,030 / 3,778 parameters"."""
    for line in path.read_text().splitlines():
        if re.match(r"\s*width:\s*\{choice:", line) and "#" in line:
            comment = line.split("#", 1)[1]
            numbers = []
            for number, unit in re.findall(r"(\d[\d,]*(?:\.\d+)?)\s*([kM]?)\b", comment):
                value = float(number.replace(",", ""))
                numbers.append((value, unit))
            return numbers
    raise AssertionError(f"{path.name}: no commented `width: {{choice: ...}}` line")


@pytest.mark.parametrize("path", [p for p in SPECS if p.name != "digits.yaml"], ids=_spec_id)
def test_parameter_counts_in_spec_comments_match_the_models(path: Path):
    spec = load_spec(path)
    assert isinstance(spec.space.width, Choice)
    shape, classes = IMAGE_SHAPE[spec.data.dataset], NUM_CLASSES[spec.data.dataset]
    counts = [
        count_parameters(build_model(spec.student.family, shape, classes, w, **spec.student.options))
        for w in spec.space.width.choice
    ]
    written = _width_comment_numbers(path)
    assert len(written) == len(counts), f"{path.name}: comment lists {written} for widths {spec.space.width.choice}"
    for (value, unit), actual in zip(written, counts):
        scale = {"": 1, "k": 1_000, "M": 1_000_000}[unit]
        # "17k" means 16,500 <= n < 17,500; "1,030" means exactly 1,030.
        assert abs(actual - value * scale) <= scale / 2, f"{path.name}: comment says {value:g}{unit}, model has {actual}"


@pytest.mark.parametrize("path", [p for p in SPECS if p.name != "digits.yaml"], ids=_spec_id)
def test_teacher_is_at_least_as_large_as_every_student(path: Path):
    spec = load_spec(path)
    shape, classes = IMAGE_SHAPE[spec.data.dataset], NUM_CLASSES[spec.data.dataset]
    teacher = spec.teachers()[0]
    teacher_params = count_parameters(build_model(teacher.family, shape, classes, teacher.width, **teacher.options))
    widest = max(float(w) for w in possible_values(spec.space.width))
    student_params = count_parameters(build_model(spec.student.family, shape, classes, widest, **spec.student.options))
    assert teacher_params >= student_params


@pytest.mark.parametrize("path", CIFAR_SPECS, ids=_spec_id)
def test_cifar_specs_share_gpus_and_stop_early_within_the_budget(path: Path):
    from kdtune.scheduler import rung_milestones

    spec = load_spec(path)
    assert 0 < spec.resources.gpus < 1, "the cluster examples fit two trials per GPU"
    epochs = int(max(possible_values(spec.space.epochs)))
    rungs = rung_milestones(spec.early_stopping.grace_period, epochs, spec.early_stopping.reduction_factor)
    # grace 10, eta 3: comparisons at 10, 30, 90 epochs, all before the end of a trial.
    assert rungs[0] == spec.early_stopping.grace_period and len(rungs) >= 3 and rungs[-1] < epochs
    assert spec.early_stopping.rule == "size_aware_asha" and spec.early_stopping.size_key == "width"
    assert spec.checkpoint_every and epochs % spec.checkpoint_every == 0


# ------------------------------------------------------------------ the CLI in docs


def _invocations_in_tokens(tokens: list[str]) -> Iterator[list[str]]:
    for index, token in enumerate(tokens):
        if " " in token and "kdtune" in token:  # a quoted command, e.g. ray exec "... && kdtune search ..."
            try:
                yield from _invocations_in_tokens(shlex.split(token))
            except ValueError:
                continue
        elif token == "kdtune" and index + 1 < len(tokens) and tokens[index + 1] in main.commands:
            args = []
            for arg in tokens[index + 1:]:
                if arg in SHELL_OPERATORS or arg.startswith("#"):
                    break
                args.append(arg)
            yield args


def kdtune_invocations(text: str) -> list[list[str]]:
    """Every `kdtune COMMAND ...` in shell-like text (one command per line, `\\` joins
    lines, YAML comment markers are stripped), as the argument list after `kdtune`."""
    found = []
    for line in text.replace("\\\n", " ").splitlines():
        line = line.strip().lstrip("#").strip()
        if "kdtune" not in line:
            continue
        try:
            tokens = shlex.split(line)
        except ValueError:  # prose with an apostrophe, not a command
            continue
        found.extend(_invocations_in_tokens(tokens))
    return found


def fenced_code(markdown: str) -> str:
    """The contents of the ``` code blocks of a markdown text."""
    return "\n".join(re.findall(r"^```[^\n]*\n(.*?)^```", markdown, flags=re.M | re.S))


def parse_cli(args: list[str]) -> tuple[str, dict[str, Any]]:
    """Parse `kdtune ARGS` with the real click CLI, without running it; raises click.UsageError."""
    ctx = main.make_context("kdtune", list(args))
    with ctx:
        rest = [*ctx._protected_args, *ctx.args] if hasattr(ctx, "_protected_args") else [*ctx.protected_args, *ctx.args]
        name, command, command_args = main.resolve_command(ctx, rest)
        sub = command.make_context(name, command_args, parent=ctx)
        return name, dict(sub.params)


def test_parse_cli_rejects_what_the_cli_rejects():
    name, params = parse_cli(["search", "s.yaml", "--address", "auto", "--storage", "s3://b/k"])
    assert name == "search" and params["address"] == "auto" and params["storage"] == "s3://b/k"
    with pytest.raises(click.UsageError):
        parse_cli(["search", "s.yaml", "--no-such-flag"])
    with pytest.raises(click.UsageError):
        parse_cli(["serach", "s.yaml"])


def test_invocation_finder_reads_quoted_and_chained_commands():
    text = (
        '#   ray exec --tmux c.yaml "cd ~/src && kdtune search a.yaml --address auto --results ~/r"\n'
        "cd /opt && kdtune validate b.yaml # comment\n"
        "the `kdtune search` step trains the teacher\n"
    )
    assert kdtune_invocations(text) == [
        ["search", "a.yaml", "--address", "auto", "--results", "~/r"],
        ["validate", "b.yaml"],
    ]


def _texts_with_commands() -> dict[str, str]:
    texts = {str(p.relative_to(REPO)): p.read_text() for p in SPECS}
    texts[str(RAY_CLUSTER.relative_to(REPO))] = RAY_CLUSTER.read_text()
    texts[str(RAYJOB.relative_to(REPO)) + " (entrypoint)"] = _yaml(RAYJOB)["spec"]["entrypoint"]
    for doc in DOCS:
        texts[str(doc.relative_to(REPO))] = fenced_code(doc.read_text())
    return texts


@pytest.mark.parametrize("where", sorted(_texts_with_commands()))
def test_every_kdtune_command_shipped_parses_and_names_an_existing_spec(where: str):
    invocations = kdtune_invocations(_texts_with_commands()[where])
    if where.startswith("cluster/") or where.startswith("docs/"):
        assert invocations, f"{where}: expected at least one kdtune command"
    for args in invocations:
        try:
            name, params = parse_cli(args)
        except click.UsageError as exc:
            pytest.fail(f"{where}: `kdtune {' '.join(args)}` is rejected by the CLI: {exc.format_message()}")
        if "spec" in params:
            spec_path = REPO / params["spec"]
            assert spec_path.is_file(), f"{where}: `kdtune {' '.join(args)}` names {params['spec']}, not in the repo"
            load_spec(spec_path)


def _search_command(text: str, where: str) -> dict[str, Any]:
    searches = [parse_cli(args)[1] for args in kdtune_invocations(text) if args[0] == "search"]
    assert len(searches) == 1, f"{where}: expected exactly one `kdtune search`, found {len(searches)}"
    return searches[0]


def test_rayjob_entrypoint_runs_a_cluster_search_on_the_image_spec():
    params = _search_command(_yaml(RAYJOB)["spec"]["entrypoint"], "rayjob entrypoint")
    assert params["address"] == "auto"
    assert params["storage"], "a multi-node search needs --storage"
    assert not params["resume"], "a fresh RayJob starts a study; --resume is added by hand"


def test_cluster_launcher_command_runs_a_cluster_search_with_shared_storage():
    params = _search_command(RAY_CLUSTER.read_text(), "ray-cluster.yaml")
    assert params["address"] == "auto"
    # The launcher's nodes have only their own disks: the experiment must go to a URI.
    assert "://" in str(params["storage"])


# ------------------------------------------------------------------ the manifests


def _rayjob_pods(rayjob: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Pod specs of the RayJob by role: head, each worker group, submitter."""
    cluster = rayjob["spec"]["rayClusterSpec"]
    pods = {"head": cluster["headGroupSpec"]["template"]["spec"]}
    for group in cluster["workerGroupSpecs"]:
        pods[f"worker:{group['groupName']}"] = group["template"]["spec"]
    pods["submitter"] = rayjob["spec"]["submitterPodTemplate"]["spec"]
    return pods


def _dockerfile_image() -> str:
    match = re.search(r"docker build -f cluster/Dockerfile -t (\S+) \.", DOCKERFILE.read_text())
    assert match, "the Dockerfile's header must show its build command with -t IMAGE"
    return match.group(1)


def test_manifests_parse_and_have_the_expected_kinds():
    rayjob = _yaml(RAYJOB)
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    config = _yaml(RAY_CLUSTER)
    assert config["provider"]["type"] == "aws"
    assert config["head_node_type"] in config["available_node_types"]


def test_cluster_launcher_config_matches_rays_schema():
    jsonschema = pytest.importorskip("jsonschema")
    ray_spec = importlib.util.find_spec("ray")
    assert ray_spec is not None and ray_spec.submodule_search_locations
    schema_path = Path(list(ray_spec.submodule_search_locations)[0]) / "autoscaler" / "ray-schema.json"
    jsonschema.validate(_yaml(RAY_CLUSTER), json.loads(schema_path.read_text()))


def test_both_manifests_and_the_dockerfile_name_the_same_image():
    image = _dockerfile_image()
    assert re.fullmatch(r"[a-z0-9.\-]+(:\d+)?(/[a-z0-9._\-]+)+:[\w.\-]+", image), f"not a valid image reference: {image}"
    assert _yaml(RAY_CLUSTER)["docker"]["image"] == image
    for role, pod in _rayjob_pods(_yaml(RAYJOB)).items():
        for container in pod["containers"]:
            assert container["image"] == image, f"rayjob {role} runs {container['image']}, the Dockerfile builds {image}"
    assert image in (CLUSTER / "README.md").read_text()


def test_image_holds_the_spec_where_the_rayjob_looks_for_it():
    text = DOCKERFILE.read_text()
    workdir = re.findall(r"^WORKDIR\s+(\S+)", text, flags=re.M)[-1]
    copies = re.findall(r"^COPY\s+(?:--\S+\s+)*(.+)$", text, flags=re.M)
    destinations = {tuple(line.split())[-1].rstrip("/") for line in copies}
    assert f"{workdir}/search_spaces" in destinations, "the Dockerfile must copy search_spaces/ into its WORKDIR"
    entrypoint = _yaml(RAYJOB)["spec"]["entrypoint"]
    assert entrypoint.split("&&")[0].split() == ["cd", workdir]


def test_dockerignore_keeps_every_copied_source_in_the_build_context():
    ignore = [line.strip() for line in (CLUSTER / "Dockerfile.dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*", "the context should start empty (no .venv, results or .git)"
    included = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for line in re.findall(r"^COPY\s+(?:--\S+\s+)*(.+)$", DOCKERFILE.read_text(), flags=re.M):
        for source in line.split()[:-1]:
            assert source in included, f"COPY {source}: excluded by Dockerfile.dockerignore"
            assert (REPO / source).exists(), f"COPY {source}: not in the repository"


def test_no_file_turns_token_authentication_off():
    disabled = re.compile(r"RAY_AUTH_MODE\s*[=:]\s*[\"']?disabled", re.I)

    def strings(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            for key, value in node.items():
                yield str(key)
                yield from strings(value)
        elif isinstance(node, list):
            for item in node:
                yield from strings(item)
        elif node is not None:
            yield str(node)

    for path in (RAYJOB, RAY_CLUSTER, *SPECS):  # YAML values (comments may say "never ...")
        for value in strings(_yaml(path)):
            assert not disabled.search(value), f"{path.name} sets {value!r}"
    code_lines = [line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")]
    assert not any(disabled.search(line) for line in code_lines)
    for doc in DOCS:
        for line in fenced_code(doc.read_text()).splitlines():
            assert not disabled.search(line.split("#")[0]), f"{doc.name} shows a command that disables auth: {line}"


def test_token_authentication_is_on_everywhere_and_the_token_is_never_inline():
    assert re.search(r"^ENV\b[^#]*\bRAY_AUTH_MODE=token\b", DOCKERFILE.read_text(), flags=re.M | re.S)
    assert "RAY_AUTH_TOKEN=" not in "".join(
        line for line in DOCKERFILE.read_text().splitlines(keepends=True) if not line.lstrip().startswith("#")
    )

    config = _yaml(RAY_CLUSTER)
    assert any("RAY_AUTH_MODE=token" in option for option in config["docker"]["run_options"])
    assert "~/.ray/auth_token" in config["file_mounts"], "every node needs the token file"

    secrets = set()
    for role, pod in _rayjob_pods(_yaml(RAYJOB)).items():
        for container in pod["containers"]:
            env = {item["name"]: item for item in container.get("env", [])}
            assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", f"rayjob {role}: RAY_AUTH_MODE is not token"
            token = env.get("RAY_AUTH_TOKEN", {})
            assert "value" not in token, f"rayjob {role}: the token must come from a Secret, not inline"
            secrets.add(token["valueFrom"]["secretKeyRef"]["name"])
    assert len(secrets) == 1, f"all Ray pods and the submitter must share one token Secret, found {secrets}"


def _flag_value(command: str, flag: str) -> str | None:
    match = re.search(rf"{flag}[=\s]+(\S+)", command)
    return match.group(1) if match else None


def test_dashboard_is_local_only_or_unexposed():
    config = _yaml(RAY_CLUSTER)
    for command in config["head_start_ray_commands"]:
        host = _flag_value(command, "--dashboard-host")
        assert host in (None, "127.0.0.1", "localhost"), f"ray-cluster.yaml: dashboard bound to {host}"

    head_group = _yaml(RAYJOB)["spec"]["rayClusterSpec"]["headGroupSpec"]
    host = head_group.get("rayStartParams", {}).get("dashboard-host")
    assert host in (None, "127.0.0.1", "localhost")
    # KubeRay's head service: ClusterIP and no Ingress keep it inside the Kubernetes cluster.
    assert head_group.get("serviceType", "ClusterIP") == "ClusterIP"
    assert head_group.get("enableIngress", False) is False


def test_head_nodes_run_no_trials():
    config = _yaml(RAY_CLUSTER)
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and head["resources"].get("GPU", 0) == 0
    head_group = _yaml(RAYJOB)["spec"]["rayClusterSpec"]["headGroupSpec"]
    assert str(head_group["rayStartParams"]["num-cpus"]) == "0"


def _entrypoint_spec() -> SearchSpec:
    params = _search_command(_yaml(RAYJOB)["spec"]["entrypoint"], "rayjob entrypoint")
    return load_spec(REPO / params["spec"])


def test_rayjob_paths_lie_on_the_shared_volume_of_every_pod():
    rayjob = _yaml(RAYJOB)
    params = _search_command(rayjob["spec"]["entrypoint"], "rayjob entrypoint")
    spec = _entrypoint_spec()
    needed = {"--storage": str(params["storage"]), "--results": str(params["results_root"]), "data.root": spec.data.root}
    for role, pod in _rayjob_pods(rayjob).items():
        if role == "submitter":
            continue  # it only runs `ray job submit`
        claims = {v["name"] for v in pod.get("volumes", []) if "persistentVolumeClaim" in v}
        mounts = [m["mountPath"].rstrip("/") for c in pod["containers"] for m in c.get("volumeMounts", [])
                  if m["name"] in claims]
        for what, path in needed.items():
            if "://" in path:
                continue
            assert any(path == m or path.startswith(m + "/") for m in mounts), (
                f"rayjob {role}: {what} {path} is not on a mounted PersistentVolumeClaim ({mounts})")


def _quantity(value: Any) -> float:
    return float(str(value).rstrip("m")) / (1000 if str(value).endswith("m") else 1)


def test_workers_fit_whole_trials_and_kdtune_plans_two_per_gpu():
    # ray-cluster.yaml: 8-CPU, 1-GPU workers; the spec in its command asks 4 CPUs and half a GPU.
    config = _yaml(RAY_CLUSTER)
    params = _search_command(RAY_CLUSTER.read_text(), "ray-cluster.yaml")
    spec = load_spec(REPO / params["spec"])
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert all(t["min_workers"] == t["max_workers"] for t in workers), "kdtune sizes concurrency at start"
    cluster = {"CPU": sum(t["resources"]["CPU"] * t["min_workers"] for t in workers),
               "GPU": sum(t["resources"]["GPU"] * t["min_workers"] for t in workers)}
    gpus = int(cluster["GPU"])
    placement = plan_placement(spec, cluster, spec.num_samples)
    assert placement.device == "cuda" and placement.resources == {"cpu": 4, "gpu": 0.5}
    assert placement.max_concurrent == 2 * gpus

    # rayjob.yaml: the same per-pod shape; the node that hosts the driver still fits a trial.
    rayjob = _yaml(RAYJOB)
    spec = _entrypoint_spec()
    for group in rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        assert group["replicas"] == group["minReplicas"] == group["maxReplicas"]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        cpus, gpus = _quantity(limits["cpu"]), _quantity(limits["nvidia.com/gpu"])
        assert cpus // spec.resources.cpus == gpus / spec.resources.gpus == 2
        left_cpu = cpus - float(rayjob["spec"].get("entrypointNumCpus", 0))
        left_gpu = gpus - float(rayjob["spec"].get("entrypointNumGpus", 0))
        assert left_cpu >= spec.resources.cpus and left_gpu >= spec.resources.gpus
