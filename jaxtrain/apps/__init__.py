"""Applications built on the jaxtrain core; the core never imports this package.

What lives here: `digits` (the digits recipe behind ``jaxtrain train``: `TrainConfig`,
`run`), `cli` (the ``jaxtrain`` command line), `fields` (config fields that generate the
CLI), `run_folder` (run folders and their lock), `tasks` (classification/regression
losses and evaluations, `init_model`), `text` (char-LM helpers), `plots` (curves of run
folders) and `doctor` (backend/device preflight).

What must not live here: anything the core needs. Modules here may import the core and
each other; no module outside ``jaxtrain.apps`` and ``jaxtrain.contrast`` imports them
(``tests/test_layout.py`` checks this statically).
"""
