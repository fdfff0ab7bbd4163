"""Which stages ``dvc repro`` will run: the ones DVC finds changed, and every stage downstream of them.

Read from DVC itself (``Repo.status`` and the stage graph), so the plan names exactly the stages
DVC would start, in the order it starts them. ``dvc status`` lists only stages whose own deps,
params or outputs changed; a stage downstream of one reruns too, because its deps will change.
"""

from __future__ import annotations

from pathlib import Path

import networkx as nx
import yaml

from ..errors import InputError

# Stages whose output is the same bytes whenever they pass (dvc.yaml: check_params writes a
# constant stamp): DVC reruns nothing downstream of them for their own rerun.
CONSTANT_OUTPUT = {"check_params"}


def stages_to_run(repo_root: Path) -> list[str] | None:
    """Stage names (``scheme_sensitivity@<scheme>`` for foreach stages) in the order DVC runs them;
    None when ``repo_root`` is not a DVC project (then the plan covers every stage)."""
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    try:
        repo = Repo(str(repo_root))
    except NotDvcRepoError:
        return None
    with repo:
        changed = set(repo.status())
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        nodes = {stage.addressing: stage for stage in graph.nodes}
        run = set()
        for name in changed & set(nodes):
            downstream = set() if name in CONSTANT_OUTPUT else nx.ancestors(graph, nodes[name])
            run |= {name} | {s.addressing for s in downstream}
        order = [s.addressing for s in nx.topological_sort(graph.reverse(copy=False))]
    return [name for name in order if name in run]


def all_stages(
    schemes: tuple[str, ...], dvc_yaml: Path = Path("dvc.yaml"), targets: tuple[str, ...] = ()
) -> list[str]:
    """Every stage of ``dvc_yaml`` in its order (the order ``dvc repro`` runs them from scratch), a
    ``foreach`` stage once per item of its list: ``quantize.targets`` for ``quantize``,
    ``schemes.run`` for the others."""
    try:
        stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as e:
        raise InputError(f"{dvc_yaml}: not this project's DVC pipeline ({e})") from e
    names = []
    for name, stage in stages.items():
        if "foreach" not in stage:
            names.append(name)
            continue
        items = targets if "quantize.targets" in str(stage["foreach"]) else schemes
        names += [f"{name}@{item}" for item in items]
    return names
