{{/*
Chart name, truncated to the 63 characters a DNS label allows.
*/}}
{{- define "chorus.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name; the release name alone when it already contains the chart name.
Truncated to 45 characters so the longest suffix ("-ws-node-internal", 17) still fits in 63.
*/}}
{{- define "chorus.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 45 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 45 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 45 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
"chorus-0.1.0", for the helm.sh/chart label.
*/}}
{{- define "chorus.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels on every object. Call with (dict "ctx" $ "component" "ws-node"), and "pool" for the objects
of a worker pool.
*/}}
{{- define "chorus.labels" -}}
helm.sh/chart: {{ include "chorus.chart" .ctx }}
{{ include "chorus.selectorLabels" . }}
{{- if .ctx.Chart.AppVersion }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/part-of: chorus
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
{{- end }}

{{/*
Selector labels: immutable on a Deployment, so nothing here may ever change between upgrades.
Call with (dict "ctx" $ "component" "ws-node"); a worker pool's (chorus.workers) add "pool".
*/}}
{{- define "chorus.selectorLabels" -}}
app.kubernetes.io/name: {{ include "chorus.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
{{- if .component }}
app.kubernetes.io/component: {{ .component }}
{{- end }}
{{- if .pool }}
chorus/worker-pool: {{ .pool }}
{{- end }}
{{- end }}

{{- define "chorus.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "chorus.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "chorus.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
The Secret holding the four credentials: the user's existingSecret, or the one this chart creates.
*/}}
{{- define "chorus.secretName" -}}
{{- default (include "chorus.fullname" .) .Values.secrets.existingSecret }}
{{- end }}

{{/*
One env entry read from the credentials Secret. Call with (dict "ctx" $ "env" "REDIS_URL" "key" "redisUrl").
*/}}
{{- define "chorus.secretEnv" -}}
- name: {{ .env }}
  valueFrom:
    secretKeyRef:
      name: {{ include "chorus.secretName" .ctx }}
      key: {{ get .ctx.Values.secrets.keys .key }}
{{- end }}

{{/*
Which Redis REDIS_URL points at (values `redis`), as ConfigMap data lines: the same for the ws-node,
the worker and every pool, which must agree. Only what differs from the components' defaults is
set, so a one-primary install's ConfigMaps (and their checksums) stay as they were. The schema
refuses `cluster` together with `sentinels`.
*/}}
{{- define "chorus.redisEnv" -}}
{{- if .Values.redis.cluster }}
REDIS_CLUSTER: "true"
{{- end }}
{{- with .Values.redis.sentinels }}
REDIS_SENTINELS: {{ join "," . | quote }}
REDIS_SENTINEL_MASTER: {{ $.Values.redis.sentinelMaster | quote }}
{{- end }}
{{- end }}

{{/*
The Pod-level fields shared by every Chorus pod (ws-node, agent-worker, migration).
*/}}
{{- define "chorus.podCommon" -}}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
Seconds `python -m ws_node` may still take after its DRAIN_SECONDS window (ws_node/app.py drain(),
ws_node/__main__.py): it waits up to 5 s for sockets that have not closed (half-open peers that never
answer the close), then aiohttp's shutdown cancels them, which measured ~4.3 s more. Keep in step
with the node; docs/operations.md has the timeline.
*/}}
{{- define "chorus.nodeExitTailSeconds" -}}
10
{{- end }}

{{/*
Fail rendering, with a message a user can act on, when the shutdown timings cannot work:
Kubernetes sends SIGKILL once terminationGracePeriodSeconds have passed since the pod started
terminating, and that clock includes the preStop sleep. After its DRAIN_SECONDS window a node still
needs up to chorus.nodeExitTailSeconds to exit (see that helper).
*/}}
{{- define "chorus.validateValues" -}}
{{- $node := .Values.node }}
{{- $tail := int (include "chorus.nodeExitTailSeconds" .) }}
{{- $nodeNeeds := add $node.preStopSleepSeconds $node.drainSeconds $tail }}
{{- if lt (int $node.terminationGracePeriodSeconds) (int $nodeNeeds) }}
{{- fail (printf "node.terminationGracePeriodSeconds (%d) must be at least node.preStopSleepSeconds (%d) + node.drainSeconds (%d) + %d s for the node to exit after its drain window = %d, or ws-node pods are killed before their sockets finish draining" (int $node.terminationGracePeriodSeconds) (int $node.preStopSleepSeconds) (int $node.drainSeconds) $tail (int $nodeNeeds)) }}
{{- end }}
{{- $workers := (include "chorus.workers" . | fromJson).workers }}
{{- range $w := $workers }}
{{- $worker := $w.values }}
{{- if le (int $worker.terminationGracePeriodSeconds) (int $worker.drainSeconds) }}
{{- fail (printf "%s.terminationGracePeriodSeconds (%d) must be greater than %s.drainSeconds (%d), or agent-worker pods are killed with runs still in flight; set it to at least %d" $w.path (int $worker.terminationGracePeriodSeconds) $w.path (int $worker.drainSeconds) (add $worker.drainSeconds 10)) }}
{{- end }}
{{- end }}
{{- range $c := (include "chorus.components" . | fromJson).components }}
{{- $pdb := $c.values.podDisruptionBudget }}
{{- if and $pdb.enabled (eq (kindIs "invalid" $pdb.minAvailable) (kindIs "invalid" $pdb.maxUnavailable)) }}
{{- fail (printf "%s.podDisruptionBudget: set exactly one of minAvailable and maxUnavailable (the other to null)" $c.path) }}
{{- end }}
{{- end }}
{{- if not $workers }}
{{- fail "worker.enabled is false and workerPools is empty: no agent worker would run, and every run would wait for ever" }}
{{- end }}
{{- $fullname := include "chorus.fullname" . }}
{{- $seen := list }}
{{- range $i, $pool := .Values.workerPools }}
{{- if has $pool.name $seen }}
{{- fail (printf "workerPools[%d]: another pool is already named %q; pool names must be unique" $i $pool.name) }}
{{- end }}
{{- $seen = append $seen $pool.name }}
{{- $service := printf "%s-worker-%s-internal" $fullname $pool.name }}
{{- if gt (len $service) 63 }}
{{- fail (printf "workerPools[%d]: the pool's metrics Service would be named %s, %d characters; Kubernetes allows 63: shorten the pool's name (or fullnameOverride)" $i $service (len $service)) }}
{{- end }}
{{- end }}
{{- end }}
