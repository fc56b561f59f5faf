"""Command lines: ``diffjax train|sample|evaluate|convert|viz`` and their shared plumbing
(``common``)."""
