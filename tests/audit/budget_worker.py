"""A separate process for the shared-budget tests: configures coworker on an audit store with
a budget policy, then runs one chat per command line read from stdin and answers each.

Commands: ``chat USER TOKENS`` runs a chat run as USER recording TOKENS input tokens and
answers ``ok`` or ``refused <rule> <budget>``; ``refreshes`` answers how many ledger queries
this process's budgets ran; ``quit`` shuts coworker down (every record durable) and exits.
"""

from __future__ import annotations

import json
import sys

import coworker


def main(url: str, policy: str) -> int:
    """Serve commands from stdin until ``quit`` or end of input."""
    coworker.configure(audit=url, policy=json.loads(policy), metrics=False)

    @coworker.run(operation="chat", doctype="Chat")
    def chat(tokens: int) -> None:
        coworker.record_usage(model="gpt-4o", input_tokens=tokens, output_tokens=0)

    print("ready", flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] == "quit":
            break
        if words[0] == "refreshes":
            from coworker._state import SETTINGS

            usage = SETTINGS.policy.policy.usage  # type: ignore[union-attr]
            print(usage.ledger.refreshes if usage.ledger is not None else -1, flush=True)
            continue
        user, tokens = words[1], int(words[2])
        try:
            with coworker.acting_as(user):
                chat(tokens)
        except coworker.BudgetExceeded as exc:
            print(f"refused {exc.rule} {exc.budget}", flush=True)
        else:
            print("ok", flush=True)
    coworker.shutdown()
    print("bye", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
