#!/bin/bash
# Toy proof of scale (issue 23, reduced): DenseVLM from compact-target shards on a small versus a 12.5x larger
# slice of the zoo world (the 4000 vs 50 000), the same step budget, 3 seeds; prints each run's final
# region numbers (metrics.json "final") as JSON lines. Sizes are arguments so the full version is the same script:
#   tools/toy_scale.sh WORK [LARGE=4000] [SMALL=320] [STEPS=120] [IMAGE_SIZE=96] [NUM_VAL=200]
#   (issue size: tools/toy_scale.sh WORK 50000 4000 <steps> 192 500)
set -euo pipefail
W=$1; LARGE=${2:-4000}; SMALL=${3:-320}; STEPS=${4:-120}; SIZE=${5:-96}; NVAL=${6:-200}
PY=${PYTHON:-python}
R=configs/train/densevlm_toy_shards.yaml
COMMON=(student_text.vocabulary=$W/world teacher_text.vocabulary=$W/world data.source.path=$W/world
        teacher_cache=$W/compact data.image_size=$SIZE eval.data.image_size=$SIZE loop.cpu=true
        eval.data.panoptic_json=$W/world/annotations/panoptic_val.json eval.data.image_root=$W/world/images/val
        eval.text.vocabulary=$W/world)
t0=$(date +%s)
[[ -d $W/world/annotations ]] || $PY -m densevlm.cli toyworld -c configs/toyworld/zoo.yaml --out $W/world \
    --set num_train=$LARGE num_val=$NVAL workers=1 >/dev/null
echo "{\"stage\": \"world\", \"seconds\": $(( $(date +%s) - t0 ))}"
$PY -m densevlm.cli cache-teacher -c $R --set "${COMMON[@]}" loop.batch_size=32 loop.num_workers=0 >$W/cache.json
echo "{\"stage\": \"compact store\", \"seconds\": $(( $(date +%s) - t0 ))}"
for N in $LARGE $SMALL; do
  $PY -m densevlm.cli shards write -c $R --set "${COMMON[@]}" data.shards=$W/shards_$N data.source.max_images=$N \
      data.shard_size=100 >$W/shards_$N.json
done
echo "{\"stage\": \"shards\", \"seconds\": $(( $(date +%s) - t0 ))}"
for SEED in 0 1 2; do
  for N in $SMALL $LARGE; do
    OUT=$W/run_${N}_s$SEED
    [[ -f $OUT/metrics.json ]] || $PY -m densevlm.cli train -c $R --overwrite --set "${COMMON[@]}" data.shards=$W/shards_$N \
        output_dir=$OUT loop.seed=$SEED loop.max_steps=$STEPS loop.epochs=1000 loop.eval_every=0 \
        loop.num_workers=1 loop.checkpoint_every_steps=null loop.log_every=20 >$OUT.log 2>&1
    $PY -c "import json,sys; m=json.load(open('$OUT/metrics.json')); print(json.dumps({'images': $N, 'seed': $SEED, 'steps': m['global_step'], 'final': m.get('final')}))"
  done
done
echo "{\"stage\": \"done\", \"seconds\": $(( $(date +%s) - t0 ))}"
