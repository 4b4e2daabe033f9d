"""Classify a JSONL file of messages with a task's seed examples, printing one JSON line per message.

    python examples/classify_file.py examples/banking/task.yaml examples/banking/messages.jsonl

Each input line is {"text": ...}; when it also has a "label", the script ends with the accuracy. The session
uses the embedded LLM (Gemma 3 270M through llama.cpp) for the messages its fallback is unsure of; the summary
counts the answers per route.
"""

import json
import sys
import time
from collections import Counter

from labelcascade import Session


def main(task_path: str, messages_path: str) -> None:
    with open(messages_path, encoding="utf-8") as file:
        rows = [json.loads(line) for line in file if line.strip()]
    start = time.perf_counter()
    session = Session.create(task_path)
    print(f"# trained on the seed examples of {task_path} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    predictions = session.classify([row["text"] for row in rows])
    for row, prediction in zip(rows, predictions, strict=True):
        print(json.dumps({"text": row["text"], "label": prediction.label, "confidence": round(prediction.confidence, 3),
                          "route": prediction.route.value}))
    routes = Counter(prediction.route.value for prediction in predictions)
    print(f"# {len(rows)} messages in {time.perf_counter() - start:.1f} s; routes: {dict(routes)}", file=sys.stderr)
    labelled = [(row["label"], p.label) for row, p in zip(rows, predictions, strict=True) if "label" in row]
    if labelled:
        correct = sum(truth == answer for truth, answer in labelled)
        print(f"# accuracy {correct}/{len(labelled)} = {correct / len(labelled):.3f}", file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python examples/classify_file.py TASK.yaml MESSAGES.jsonl")
    main(sys.argv[1], sys.argv[2])
