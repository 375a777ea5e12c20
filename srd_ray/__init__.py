"""srd-ray: Selective Reflection Distillation (SRD) as batch jobs on Ray.

Stages, one module each: ``reflect`` (the student answers every prompt and is scored), ``rank``
(reciprocal rank fusion into difficulty buckets), ``distill`` (curriculum knowledge distillation on Ray
Train) and ``evaluate`` (ROUGE-L of sampled answers on held-out sets).
"""

__version__ = "0.1.0"
