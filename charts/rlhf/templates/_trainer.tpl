{{/* Trainer Jobs (sft, reward-model, ppo): one definition for the chart and for `rlhf k8s submit`. */}}

{{/* values key -> job slug / CLI name: sft -> sft, rewardModel -> reward-model, ppo -> ppo. */}}
{{- define "rlhf.jobSlug" -}}
{{- if eq . "rewardModel" }}reward-model{{ else }}{{ . }}{{ end }}
{{- end }}

{{/* The trainer job's config file: chart-owned keys (ports, run folder on the checkpoint volume, resume, the
starting model, the Services it talks to), then trainer.jobs.<kind>.config. */}}
{{- define "rlhf.trainerConfig" -}}
{{- $v := .root.Values }}
{{- $slug := include "rlhf.jobSlug" .kind }}
{{- $cfg := dict "host" "0.0.0.0" "port" (int $v.trainer.port) "metrics_host" "0.0.0.0" "metrics_port" (int $v.trainer.metricsPort) }}
{{- $_ := set $cfg "log_level" $v.common.logLevel }}
{{- $_ := set $cfg "log_format" $v.common.logFormat }}
{{- if $v.auth.enabled }}{{ $_ := set $cfg "auth_token_file" "/var/run/secrets/rlhf/auth/token" }}{{ end }}
{{- $_ := set $cfg "run_dir" (printf "/checkpoints/%s" $slug) }}
{{- $_ := set $cfg "resume" true }}
{{- $_ := set $cfg "feedback_target" (include "rlhf.target" (dict "root" .root "component" "feedback")) }}
{{- if eq .kind "sft" }}
{{- $_ := set $cfg "model" "default" }}
{{- else }}
{{- $_ := set $cfg "model" "/checkpoints/sft/final" }}
{{- end }}
{{- if eq .kind "ppo" }}
{{- $_ := set $cfg "generation_target" (include "rlhf.replicasTarget" (dict "root" .root "component" "generation")) }}
{{- $_ := set $cfg "reward_target" (include "rlhf.replicasTarget" (dict "root" .root "component" "reward")) }}
{{- /* The trainer and generation pods share no /dev/shm: stream the weights over gRPC by default. */ -}}
{{- $_ := set $cfg "push_dir" "" }}
{{- end }}
{{- $user := deepCopy (default dict (index $v.trainer.jobs .kind).config) }}
{{- range $k, $_ := $user }}
{{- if has $k (list "host" "port" "metrics_host" "metrics_port" "auth_token_file" "feedback_target" "generation_target" "reward_target") }}
{{- fail (printf "trainer.jobs.%s.config.%s: set by the chart; use trainer.port / the Services instead" $.kind $k) }}
{{- end }}
{{- end }}
{{- toYaml (mergeOverwrite $cfg $user) }}
{{- end }}

{{- define "rlhf.trainerJob" -}}
{{- $root := .root }}
{{- $v := $root.Values }}
{{- $t := $v.trainer }}
{{- $slug := include "rlhf.jobSlug" .kind }}
{{- $ctx := dict "root" $root "component" "trainer" }}
apiVersion: batch/v1
kind: Job
metadata:
  name: {{ printf "%s-train-%s" (include "rlhf.fullname" $root | trunc 40 | trimSuffix "-") $slug }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "rlhf.labels" $ctx | nindent 4 }}
    rlhf.dev/job-kind: {{ $slug }}
spec:
  backoffLimit: {{ $t.backoffLimit }}
  {{- if $t.activeDeadlineSeconds }}
  activeDeadlineSeconds: {{ $t.activeDeadlineSeconds }}
  {{- end }}
  {{- if $t.ttlSecondsAfterFinished }}
  ttlSecondsAfterFinished: {{ $t.ttlSecondsAfterFinished }}
  {{- end }}
  template:
    metadata:
      labels:
        {{- include "rlhf.labels" $ctx | nindent 8 }}
        rlhf.dev/job-kind: {{ $slug }}
      annotations:
        checksum/config: {{ include "rlhf.trainerConfig" . | sha256sum }}
    spec:
      restartPolicy: Never
      serviceAccountName: {{ include "rlhf.serviceAccountName" $root }}
      automountServiceAccountToken: {{ $v.serviceAccount.automountToken }}
      {{- with $v.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- include "rlhf.podSecurityContext" $root | nindent 8 }}
      # SIGTERM makes the job checkpoint at the next step boundary; give it time to write.
      terminationGracePeriodSeconds: 300
      {{- include "rlhf.scheduling" (dict "root" $root "values" $t "gpu" true) | nindent 6 }}
      {{- with include "rlhf.modelInit" (dict "root" $root) }}
      initContainers:
        {{- . | nindent 8 }}
      {{- end }}
      containers:
        - name: trainer
          image: {{ include "rlhf.image" (dict "root" $root "gpu" true) }}
          imagePullPolicy: {{ $v.image.pullPolicy }}
          args: ["train", {{ $slug | quote }}, "--config", "/etc/rlhf/trainer-{{ $slug }}.yaml"]
          ports:
            - name: grpc
              containerPort: {{ $t.port }}
              protocol: TCP
            - name: metrics
              containerPort: {{ $t.metricsPort }}
              protocol: TCP
          env:
            - name: HOME
              value: /tmp
            - name: RLHF_CACHE_DIR
              value: /models/cache
            - name: HF_HUB_OFFLINE
              value: "1"
            {{- if $v.auth.enabled }}
            {{- range list "RLHF_FEEDBACK_TOKEN" "RLHF_GENERATION_TOKEN" "RLHF_REWARD_TOKEN" }}
            - name: {{ . }}
              valueFrom:
                secretKeyRef:
                  name: {{ include "rlhf.authSecretName" $root }}
                  key: {{ $v.auth.secretKey }}
            {{- end }}
            {{- end }}
            {{- with $v.common.extraEnv }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          securityContext:
            {{- toYaml $v.securityContext | nindent 12 }}
          resources:
            {{- include "rlhf.resources" (dict "root" $root "resources" $t.resources "gpu" true "gpus" $t.gpus) | nindent 12 }}
          volumeMounts:
            - name: config
              mountPath: /etc/rlhf
              readOnly: true
            - name: tmp
              mountPath: /tmp
            - name: models
              mountPath: /models
            - name: checkpoints
              mountPath: /checkpoints
            {{- include "rlhf.authMount" $root | nindent 12 }}
      volumes:
        - name: config
          configMap:
            name: {{ include "rlhf.componentName" (dict "root" $root "component" "config") }}
        - name: tmp
          emptyDir: {}
        {{- include "rlhf.modelsVolume" $root | nindent 8 }}
        {{- include "rlhf.checkpointsVolume" $root | nindent 8 }}
        {{- include "rlhf.authVolume" $root | nindent 8 }}
{{- end }}
