"""Knowledge distillation from the store: the KD forms' registry, the plan, the dataset and the loss.

A form (kd.form.KDForm) turns a teacher's cached arrays into the target of its KL term; the config's
`distill.form` names one. Adding a form is one file defining a KDForm subclass and one `register_kd_form` line here.
"""

from kdcache.student.kd.dataset import DistillDataset
from kdcache.student.kd.engine import TeacherTargets, distillation_loss
from kdcache.student.kd.form import KDForm, Targets, kd_form, known_forms, register_kd_form
from kdcache.student.kd.loss import KDLoss
from kdcache.student.kd.plan import KDPlan
from kdcache.student.kd.renorm import RenormForm
from kdcache.student.kd.sampled import SampledForm
from kdcache.student.kd.seed_exact import SeedExactForm
from kdcache.student.kd.tail import TailForm
from kdcache.student.kd.xtok_chunk import ChunkLikelihoodForm
from kdcache.student.kd.xtok_match import TokenMatchForm
from kdcache.student.kd.xtok_project import ProjectionForm

register_kd_form(TailForm)
register_kd_form(RenormForm)
register_kd_form(SampledForm)
register_kd_form(SeedExactForm)
register_kd_form(ChunkLikelihoodForm)
register_kd_form(TokenMatchForm)
register_kd_form(ProjectionForm)

__all__ = ["DistillDataset", "KDForm", "KDLoss", "KDPlan", "Targets", "TeacherTargets", "distillation_loss",
           "kd_form", "known_forms", "register_kd_form"]
