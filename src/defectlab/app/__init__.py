"""The inspection workbench: a review station on a real database that turns reviewed parts
into labelled defects and those into a better model (``defectlab app``, ``inspect``,
``retrain``). Top of the package: nothing else imports it."""
