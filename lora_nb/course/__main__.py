"""`python -m lora_nb.course`: run the course's notebooks and write the site (see lora_nb.course.runner)."""

from .runner import main

main()
