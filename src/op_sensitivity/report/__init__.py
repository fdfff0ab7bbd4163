"""Reading a spectrum: scores (``scores``), the Markdown report and metrics (``rank``), PNG plots
(``plots``) and the engine comparison behind the ``crosscheck`` stage (``comparison``)."""
