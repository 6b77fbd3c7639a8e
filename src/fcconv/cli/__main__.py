"""``python -m fcconv.cli``: the same as the ``fcconv`` command."""

from fcconv.cli import main

if __name__ == "__main__":
    main()
