"""`python -m minirlhf.exercises my_solutions.py`: run every check the file has a function for."""

import sys

from minirlhf.exercises import check_file


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m minirlhf.exercises PATH_TO_YOUR_SOLUTIONS.py", file=sys.stderr)
        return 2
    results = check_file(args[0])
    return 0 if results and all(r == "passed" for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
