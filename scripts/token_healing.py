"""Token healing on SmolLM2-135M: small held-out functions, prompts ending in a newline, greedy.

Each problem is a signature + docstring written for this script (not from any benchmark) and a
few asserts. The prompt ends with the docstring's closing line and a newline, as people type it.
Settings: that raw prompt without and with healing (unmask's default), and the prompt with its
trailing newline stripped (what unmask's HumanEval does) without and with healing. A completion is cut at the
first new top-level statement and run with its asserts in the sandbox.

    python scripts/token_healing.py [--model smollm2-135m] [--max-new-tokens 96]
"""

from __future__ import annotations

import argparse

from unmask.decoding import GenerationConfig
from unmask.eval.generation import complete
from unmask.eval.humaneval import cut_at_stop
from unmask.eval.sandbox import Limits, run_programs
from unmask.loading import load

PROBLEMS = [
    ('def add(a, b):\n    """Return the sum of a and b."""\n', "assert add(2, 3) == 5\nassert add(-1, 1) == 0"),
    ('def is_even(n):\n    """Return True if n is even, else False."""\n', "assert is_even(4)\nassert not is_even(7)"),
    ('def square(x):\n    """Return x multiplied by itself."""\n', "assert square(3) == 9\nassert square(-2) == 4"),
    ('def maximum(a, b):\n    """Return the larger of a and b."""\n', "assert maximum(1, 9) == 9\nassert maximum(5, 2) == 5"),
    ('def reverse_string(s):\n    """Return the string s reversed."""\n', "assert reverse_string('abc') == 'cba'\nassert reverse_string('') == ''"),
    ('def count_vowels(s):\n    """Return how many of the characters of s are vowels (a, e, i, o, u)."""\n',
     "assert count_vowels('banana') == 3\nassert count_vowels('xyz') == 0"),
    ('def factorial(n):\n    """Return n! for a non-negative integer n."""\n', "assert factorial(0) == 1\nassert factorial(5) == 120"),
    ('def last_element(items):\n    """Return the last element of the list items."""\n', "assert last_element([1, 2, 3]) == 3"),
    ('def total(numbers):\n    """Return the sum of a list of numbers."""\n', "assert total([1, 2, 3]) == 6\nassert total([]) == 0"),
    ('def celsius_to_fahrenheit(c):\n    """Convert a temperature in degrees Celsius to Fahrenheit."""\n',
     "assert celsius_to_fahrenheit(0) == 32\nassert celsius_to_fahrenheit(100) == 212"),
    ('def is_palindrome(s):\n    """Return True if s reads the same forwards and backwards."""\n',
     "assert is_palindrome('level')\nassert not is_palindrome('abc')"),
    ('def first_word(sentence):\n    """Return the first word of a sentence (words are separated by spaces)."""\n',
     "assert first_word('hello big world') == 'hello'"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    loaded = load(args.model, device=args.device)
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, seed=0)
    settings = [("raw prompt, no healing", False, False), ("raw prompt, healing", False, True),
                ("newline stripped, no healing", True, False), ("newline stripped, healing", True, True)]
    print(f"{loaded.path.name} · greedy · {args.max_new_tokens} new tokens · {len(PROBLEMS)} problems")
    for name, strip, healing in settings:
        prompts = [p.rstrip() if strip else p for p, _ in PROBLEMS]
        out = complete(loaded, prompts, config, batch_size=len(PROBLEMS), token_healing=healing)
        bodies = [cut_at_stop(text) for text in out.texts]
        sources = [f"{p}{b}\n\n{tests}\n" for p, b, (_, tests) in zip(prompts, bodies, PROBLEMS)]
        results = run_programs(sources, Limits(), 2)
        passed = sum(r.passed for r in results)
        print(f"{name:32s} {passed:2d}/{len(PROBLEMS)} pass   first body: {bodies[0][:40]!r}")


if __name__ == "__main__":
    main()
