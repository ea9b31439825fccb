"""How memcli/assets/trex was made: a slice of T-REx (CC BY-SA 4.0) in the LPAQA layout.

For each of the 41 relations, the first 100 triples (in file order) whose subject and object differ,
do not contain each other and whose subject is not ambiguous in that relation; only the labels are
kept. LPAQA's templates of each relation are copied whole (first line canonical, then its paraphrases:
``memcli compare editing`` asks held-out facts with them; ``memcli/data/forms.py`` splits them into
training and held-out templates).

    python tools/make_trex_slice.py ../shared/data/trex memcli/assets/trex
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from memcli.data.knowledge import usable  # noqa: E402

PER_RELATION = 100


def main(src: str, dst: str) -> None:
    s, d = Path(src), Path(dst)
    (d / "triples").mkdir(parents=True, exist_ok=True)
    (d / "templates").mkdir(parents=True, exist_ok=True)
    total = 0
    for p in sorted((s / "triples").glob("P*.jsonl")):
        rows = [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
        objects: dict[str, set] = {}
        for r in rows:
            objects.setdefault(r["sub_label"], set()).add(r["obj_label"])
        keep, seen = [], set()
        for r in rows:
            sub = r["sub_label"]
            if sub in seen or len(objects[sub]) > 1 or not usable(sub, r["obj_label"]):
                continue
            seen.add(sub)
            keep.append({"sub_label": sub, "obj_label": r["obj_label"]})
            if len(keep) == PER_RELATION:
                break
        (d / "triples" / p.name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in keep), encoding="utf-8")
        t = [ln.strip() for ln in (s / "templates" / f"{p.stem}.txt").read_text(encoding="utf-8").splitlines()]
        (d / "templates" / f"{p.stem}.txt").write_text("".join(ln + "\n" for ln in t if ln), encoding="utf-8")
        total += len(keep)
    print(f"{total} triples in {d}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
