"""A chat assistant's front desk: route each user message by intent, answer with that intent's handler, and hand
the conversation to a person when the session is not sure.

    python examples/chat_router.py                          # type messages, one per line; Ctrl-D ends
    python examples/chat_router.py --messages FILE          # one message per line, answered as one batch

It classifies with the banking example task (examples/banking/task.yaml): the fallback answers the messages it is
sure of, the embedded LLM (Gemma 3 270M through llama.cpp) the rest. The routing is a LangChain chain:

    as_runnable(session) | {"prediction": passthrough, "reply": RunnableBranch(unsure -> handoff, family -> reply)}
"""

import argparse
import sys
from pathlib import Path

from langchain_core.runnables import Runnable, RunnableBranch, RunnableLambda, RunnableParallel, RunnablePassthrough

from labelcascade import Session, Prediction, Route
from labelcascade.agent.engines import DEFAULT_ENGINE
from labelcascade.langchain import as_runnable

TASK = Path(__file__).parent / "banking" / "task.yaml"
MIN_CONFIDENCE = 0.5  # below this, a wrong canned answer costs more than a person's time
HANDOFF = "I'm not sure I understood. Let me pass you to a colleague who can help."
FAMILIES = [  # (the intents of a family, the reply that starts its conversation)
    (
        {"card_arrival", "lost_or_stolen_card", "pin_blocked", "change_pin"},
        "Let's sort out your card. You can freeze it, order a replacement or manage your PIN under Cards.",
    ),
    (
        {"top_up_failed", "transfer_not_received_by_recipient", "request_refund"},
        "I'll look into that payment. Please tell me its date and amount.",
    ),
    (
        {"exchange_rate", "cash_withdrawal_charge"},
        "Our rates and fees are listed under Account > Fees; I can explain any charge you see there.",
    ),
    ({"terminate_account"}, "Sorry to see you go. I can start closing your account once you confirm."),
]


def unsure(prediction: Prediction) -> bool:
    return prediction.route == Route.ABSTAIN or prediction.confidence < MIN_CONFIDENCE


def in_family(intents: set[str]):
    return lambda prediction: prediction.label in intents


def say(reply: str) -> Runnable:
    return RunnableLambda(lambda _: reply)


def router(session: Session) -> Runnable:
    """Message in, {"prediction", "reply"} out: the session's answer picks the branch that writes the reply."""
    reply = RunnableBranch(
        (unsure, say(HANDOFF)),
        *[(in_family(intents), say(text)) for intents, text in FAMILIES],
        say(HANDOFF),  # an intent with no family yet
    )
    return as_runnable(session) | RunnableParallel(prediction=RunnablePassthrough(), reply=reply)


def show(message: str, answer: dict) -> None:
    p = answer["prediction"]
    print(f"you: {message}\nbot: {answer['reply']}", flush=True)
    print(f"     [{p.label} {p.confidence:.2f}, route {p.route.value}]", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=Path, help="a file of messages, one per line (default: read stdin)")
    parser.add_argument(
        "--engine", default=DEFAULT_ENGINE, help="the LLM for unsure messages, or 'none' (default: %(default)s)"
    )
    args = parser.parse_args()
    chain = router(Session.create(TASK, engine=None if args.engine == "none" else args.engine))
    if args.messages:  # a batch: one classify call for all messages
        messages = [line.strip() for line in args.messages.read_text(encoding="utf-8").splitlines() if line.strip()]
        for message, answer in zip(messages, chain.batch(messages), strict=True):
            show(message, answer)
        return
    if sys.stdin.isatty():
        print("Type a message and press Enter; Ctrl-D ends.", file=sys.stderr)
    for line in sys.stdin:  # a chat: each message answered as it comes
        if line.strip():
            show(line.strip(), chain.invoke(line.strip()))


if __name__ == "__main__":
    main()
