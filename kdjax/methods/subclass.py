"""Subclass distillation (Müller, Kornblith & Hinton 2020).

The teacher has C*S subclass logits (`config.teacher.subclasses = S`; its class logits are logsumexp over each
class's subclasses) and is trained with CE on the class logits plus 'subclass_aux', which spreads the examples over
the subclasses. The student (`config.student.subclasses = S`) matches the teacher's subclass logits at temperature
T ('subclass_kd'), plus CE on its class logits.
"""

from kdjax import distill
from kdjax import losses
from kdjax.errors import ConfigError


def _subclass_logits(out, who: str):
  if out.subclass_logits is None:
    raise ConfigError(f'subclass losses need the {who} to have subclasses (config.{who}.subclasses > 1)')
  return out.subclass_logits


def _aux(ctx: distill.Context, cfg):
  c = cfg.subclass
  return losses.subclass_aux_loss(_subclass_logits(ctx.student, 'student'), c.temperature, c.normalize_over)


def _kd(ctx: distill.Context, cfg):
  return losses.kd_loss(_subclass_logits(ctx.student, 'student'), _subclass_logits(ctx.teacher, 'teacher'),
                        cfg.temperature)


# One section for both terms: the aux loss's temperature and how it normalises (kdjax/losses.py subclass_aux_loss);
# subclass_kd reads config.distill.temperature.
OPTIONS = distill.Options(dict(temperature=1.0, normalize_over='example'),
                          ranges=dict(temperature=distill.Range(0.0, low_ok=False)),
                          choices=dict(normalize_over=('example', 'batch')), section='subclass')

distill.register('subclass_aux', distill.Method(_aux, needs_teacher=False, hparams=('subclass.temperature',),
                                                options=OPTIONS))
distill.register('subclass_kd', distill.Method(_kd, options=OPTIONS))
