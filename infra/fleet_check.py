#!/usr/bin/env python3
"""Checks the worker fleet part of infra/template.yaml against what moto's
CloudFormation created from it (deploy_check.py), plus the parts moto skips,
read from the template itself. Prints one `ok:` line per check; exits 1
naming the first check that failed.

Usage: fleet_check.py MOTO_ENDPOINT STACK_OUTPUTS_JSON [EGRESS_MODE]  (nat, the default, or none)

In moto: the three launch templates (hibernation, IMDSv2 hop limit 1,
encrypted gp3 root sized from the instance types, instance profile, tags,
user data), the instance-type map against moto's instance type catalogue
(hibernation support, architecture, memory -> root size), the VPC (private
subnets in two AZs, S3/DynamoDB gateway endpoints, SQS interface endpoint,
NAT default route), EventBridge -> FleetEventsQueue delivery of the three
event kinds (and nothing else), least-privilege worker IAM (its one EC2
right: CreateTags of the two activity tags on worker instances), and the fleets
created through the EC2 API from the template's own EC2Fleet properties
(moto's CloudFormation skips AWS::EC2::EC2Fleet) and found by the scaler's
tag filters. From the template only (lint-only resources): the queue
policy, the fleets' spot options, the Image Builder component, the
parameter constraints and the Rules assertions (evaluated here the way
CloudFormation does, since moto enforces neither), and the build history's
rights (workers read and write `stats/*`; the scaler only reads
`stats/all.json`, named by its PACLOUD_BUCKET).
"""
import ast
import base64
import fnmatch
import json
import os
import re
import sys

import boto3
from samtranslator.yaml_helper import yaml_parse

here = os.path.dirname(os.path.abspath(__file__))
endpoint = sys.argv[1]
outputs = json.loads(sys.argv[2])
egress = sys.argv[3] if len(sys.argv) > 3 else "nat"
creds = dict(region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing", endpoint_url=endpoint)
ec2 = boto3.client("ec2", **creds)
sqs = boto3.client("sqs", **creds)
events = boto3.client("events", **creds)
iam = boto3.client("iam", **creds)
with open(os.path.join(here, "template.yaml")) as f:
    template = yaml_parse(f.read())
resources = template["Resources"]
cpu_map = template["Mappings"]["CpuFamily"]
FAMILIES = {"X8664": ("x86-64", "x86_64"), "X8664V3": ("x86-64-v3", "x86_64"), "Arm64": ("arm64", "arm64")}
OS_AND_IMAGES_GIB, BUILD_SPACE_GIB = 24, 72
checks = 0


def check(cond, what):
    global checks
    if not cond:
        sys.exit(f"fleet_check FAILED: {what}")
    checks += 1
    print(f"ok: {what}")


def tags(items):
    return {t["Key"]: t["Value"] for t in items or []}


# ---- instance-type map vs moto's catalogue -------------------------------------------
catalogue = []
for page in ec2.get_paginator("describe_instance_types").paginate():
    catalogue += page["InstanceTypes"]
fleet_req = {}
matching = {}
for key in FAMILIES:
    ovr = resources[f"WorkerFleet{key}"]["Properties"]["LaunchTemplateConfigs"][0]["Overrides"]
    fleet_req[key] = ovr[0]["InstanceRequirements"]
for key, (name, arch) in FAMILIES.items():
    m = cpu_map[key]
    req = fleet_req[key]
    check(req["AllowedInstanceTypes"] == {"Fn::FindInMap": ["CpuFamily", key, "AllowedInstanceTypes"]},
          f"{name}: the fleet takes its instance families from the CpuFamily map")
    vmin, vmax = req["VCpuCount"]["Min"], req["VCpuCount"]["Max"]
    mmin, mmax = req["MemoryMiB"]["Min"], req["MemoryMiB"]["Max"]
    chosen = [t for t in catalogue
              if any(fnmatch.fnmatch(t["InstanceType"], p) for p in m["AllowedInstanceTypes"])
              and vmin <= t["VCpuInfo"]["DefaultVCpus"] <= vmax and mmin <= t["MemoryInfo"]["SizeInMiB"] <= mmax
              and not t.get("BareMetal") and not t.get("BurstablePerformanceSupported")]
    names = sorted(t["InstanceType"] for t in chosen)
    matching[key] = names
    check(len(chosen) >= 4, f"{name}: {len(chosen)} instance types match ({', '.join(names)})")
    unsupported = [t["InstanceType"] for t in chosen if not t.get("HibernationSupported")]
    check(not unsupported, f"{name}: every matching type supports hibernation (unsupported: {unsupported})")
    wrong_arch = [t["InstanceType"] for t in chosen if arch not in t["ProcessorInfo"]["SupportedArchitectures"]]
    check(not wrong_arch, f"{name}: every matching type runs {arch} (others: {wrong_arch})")
    biggest = max(t["MemoryInfo"]["SizeInMiB"] for t in chosen) / 1024
    check(biggest <= int(m["MaxMemoryGiB"]) and int(m["MaxMemoryGiB"]) * 1024 == mmax,
          f"{name}: MaxMemoryGiB {m['MaxMemoryGiB']} covers the largest type ({biggest:g} GiB) and equals the fleet's MemoryMiB.Max")
    need = OS_AND_IMAGES_GIB + int(m["MaxMemoryGiB"]) + BUILD_SPACE_GIB
    check(int(m["RootVolumeGiB"]) >= need,
          f"{name}: root {m['RootVolumeGiB']} GiB >= {OS_AND_IMAGES_GIB} OS + {m['MaxMemoryGiB']} hibernation swap + {BUILD_SPACE_GIB} build")

# ---- launch templates -----------------------------------------------------------------
profile_arn = outputs["WorkerInstanceProfileArn"]
for key, (name, arch) in FAMILIES.items():
    lt_id = outputs[f"WorkerLaunchTemplate{key}Id"]
    lt = ec2.describe_launch_templates(LaunchTemplateIds=[lt_id])["LaunchTemplates"][0]
    check(tags(lt.get("Tags")).get("pacloud:cpu-family") == name, f"{name}: launch template {lt_id} tagged")
    data = ec2.describe_launch_template_versions(LaunchTemplateId=lt_id)["LaunchTemplateVersions"][-1]["LaunchTemplateData"]
    check(data.get("HibernationOptions", {}).get("Configured") is True, f"{name}: hibernation configured")
    md = data.get("MetadataOptions", {})
    check(md.get("HttpTokens") == "required" and md.get("HttpPutResponseHopLimit") == 1,
          f"{name}: IMDSv2 required, hop limit 1 (containers get no token)")
    (root,) = data["BlockDeviceMappings"]
    ebs = root["Ebs"]
    check(ebs.get("Encrypted") is True and ebs.get("VolumeType") == "gp3"
          and ebs.get("VolumeSize") == int(cpu_map[key]["RootVolumeGiB"]),
          f"{name}: root {root['DeviceName']} encrypted gp3 of {ebs.get('VolumeSize')} GiB")
    check("KeyName" not in data, f"{name}: no SSH key by default")
    check(data.get("IamInstanceProfile", {}).get("Arn") == profile_arn, f"{name}: the worker instance profile")
    image = ec2.describe_images(ImageIds=[data["ImageId"]])["Images"][0]
    check(image["Architecture"] == arch, f"{name}: AMI {data['ImageId']} is {arch}")
    spec = {s["ResourceType"]: tags(s["Tags"]) for s in data.get("TagSpecifications", [])}
    check(spec.get("instance") == {"pacloud:role": "worker", "pacloud:cpu-family": name} and "volume" in spec,
          f"{name}: instances and volumes tagged pacloud:role=worker, pacloud:cpu-family={name}")
    user_data = base64.b64decode(data["UserData"]).decode()
    env = dict(re.findall(r"^\s+(PACLOUD_[A-Z_]+)=(\S+)$", user_data, re.M))
    check(user_data.startswith("#cloud-config\n") and env.get("PACLOUD_AWS_QUEUE_URL") == outputs["QueueUrl"]
          and env.get("PACLOUD_AWS_TABLE") == outputs["TableName"] and env.get("PACLOUD_AWS_BUCKET") == outputs["BucketName"]
          and env.get("PACLOUD_AWS_DLQ_URL") == outputs["DeadLetterQueueUrl"],
          f"{name}: user data writes /etc/pacloud/worker.env with this stack's queue, table and bucket")
    check(env.get("PACLOUD_AWS_SIGNING_KEY_ID") == outputs["BinhostSigningKeyArn"],
          f"{name}: workers sign with this stack's KMS key (they refuse to start without one)")
    check(env.get("PACLOUD_AWS_SCALER_EVENTS_URL") == outputs["FleetEventsQueueUrl"],
          f"{name}: workers nudge this stack's scaler through its events queue")
    unknown = set(env) - {"PACLOUD_AWS_TABLE", "PACLOUD_AWS_QUEUE_URL", "PACLOUD_AWS_DLQ_URL", "PACLOUD_AWS_BUCKET",
                          "PACLOUD_AWS_SIGNING_KEY_ID", "PACLOUD_AWS_SCALER_EVENTS_URL",
                          "PACLOUD_AWS_REGION", "PACLOUD_URL_TTL_SECS", "PACLOUD_MAX_RECEIVES", "PACLOUD_WORKERS"}
    check(not unknown, f"{name}: user data sets only settings the worker reads (unknown: {sorted(unknown)})")

# ---- network ----------------------------------------------------------------------------
vpc_id = outputs["WorkerVpcId"]
subnet_ids = outputs["PrivateSubnetIds"].split(",")
subnets = ec2.describe_subnets(SubnetIds=subnet_ids)["Subnets"]
check(len({s["AvailabilityZone"] for s in subnets}) == 2 and not any(s["MapPublicIpOnLaunch"] for s in subnets),
      "two private subnets in two availability zones, no public addresses")
assoc = {r["Properties"]["SubnetId"]["Ref"]: r["Properties"]["RouteTableId"]["Ref"]
         for r in resources.values() if r["Type"] == "AWS::EC2::SubnetRouteTableAssociation"}
check(assoc.get("PrivateSubnetA") == assoc.get("PrivateSubnetB") == "PrivateRouteTable",
      "template: both private subnets use PrivateRouteTable (moto records no CloudFormation associations)")
eps = ec2.describe_vpc_endpoints(Filters=[{"Name": "vpc-id", "Values": [vpc_id]}])["VpcEndpoints"]
gateway_eps = {e["VpcEndpointId"] for e in eps if e["VpcEndpointType"] == "Gateway"}
rts = ec2.describe_route_tables(Filters=[{"Name": "vpc-id", "Values": [vpc_id]}])["RouteTables"]
private = [t for t in rts if any(r.get("GatewayId") in gateway_eps for r in t["Routes"])]
check(len(private) == 1, "one route table (the private one) carries the gateway endpoints' routes")
routes = private[0]["Routes"]
check(not any(r.get("GatewayId", "").startswith("igw-") for r in routes), "no internet gateway route from the private subnets")
nat_gateways = ec2.describe_nat_gateways(Filters=[{"Name": "vpc-id", "Values": [vpc_id]}])["NatGateways"]
igws = ec2.describe_internet_gateways(Filters=[{"Name": "attachment.vpc-id", "Values": [vpc_id]}])["InternetGateways"]
if egress == "nat":
    check(any(r.get("DestinationCidrBlock") == "0.0.0.0/0" and r.get("NatGatewayId") for r in routes),
          "EgressMode=nat: the private default route goes through the NAT gateway")
    check(len(nat_gateways) == 1 and len(igws) == 1, "EgressMode=nat: one NAT gateway, one internet gateway")
else:
    check(not any(r.get("DestinationCidrBlock") == "0.0.0.0/0" for r in routes),
          "EgressMode=none: no default route from the private subnets (AWS traffic only via endpoints)")
    check(not nat_gateways and not igws, "EgressMode=none: no NAT gateway, no internet gateway")
eps = ec2.describe_vpc_endpoints(Filters=[{"Name": "vpc-id", "Values": [vpc_id]}])["VpcEndpoints"]
by_service = {e["ServiceName"].rsplit(".", 1)[-1]: e for e in eps}
for svc in ("s3", "dynamodb"):
    e = by_service.get(svc)
    check(e is not None and e["VpcEndpointType"] == "Gateway" and private[0]["RouteTableId"] in e.get("RouteTableIds", []),
          f"{svc}: gateway endpoint on the private route table")
e = by_service.get("sqs")
check(e is not None and e["VpcEndpointType"] == "Interface" and e.get("PrivateDnsEnabled") is True
      and sorted(e.get("SubnetIds", [])) == sorted(subnet_ids), "sqs: interface endpoint with private DNS in both subnets")

# ---- EventBridge -> FleetEventsQueue ------------------------------------------------------
queue_url = outputs["FleetEventsQueueUrl"]
attrs = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["MessageRetentionPeriod", "VisibilityTimeout"])["Attributes"]
check(attrs["MessageRetentionPeriod"] == "300", "FleetEventsQueue keeps events for 300 s")
scaler_timeout = resources["ScalerFunction"]["Properties"]["Timeout"]
check(int(attrs["VisibilityTimeout"]) >= int(scaler_timeout),
      f"FleetEventsQueue's visibility timeout ({attrs['VisibilityTimeout']} s) is at least the scaler's timeout "
      f"({scaler_timeout} s): Lambda refuses the event source otherwise")
kinds = {
    "EC2 Spot Instance Interruption Warning": {"instance-id": "i-0123456789abcdef0", "instance-action": "hibernate"},
    "EC2 Instance Rebalance Recommendation": {"instance-id": "i-0123456789abcdef0"},
    "EC2 Instance State-change Notification": {"instance-id": "i-0123456789abcdef0", "state": "stopped"},
}
entries = [{"Source": "aws.ec2", "DetailType": k, "Detail": json.dumps(v)} for k, v in kinds.items()]
entries.append({"Source": "aws.ec2", "DetailType": "EC2 Fast Snapshot Restore State-change Notification", "Detail": "{}"})
entries.append({"Source": "pacloud.test", "DetailType": "EC2 Instance State-change Notification", "Detail": "{}"})
check(events.put_events(Entries=entries)["FailedEntryCount"] == 0, "put_events accepted 3 fleet events and 2 unrelated ones")
got = []
for _ in range(10):
    msgs = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=1).get("Messages", [])
    for msg in msgs:
        got.append(json.loads(msg["Body"]))
        sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=msg["ReceiptHandle"])
    if len(got) >= 3 and not msgs:
        break
check(sorted(e["detail-type"] for e in got) == sorted(kinds) and all(e["source"] == "aws.ec2" for e in got),
      f"exactly the three fleet event kinds reached FleetEventsQueue (got {sorted(e['detail-type'] for e in got)})")
spot = next(e for e in got if e["detail-type"] == "EC2 Spot Instance Interruption Warning")
check(spot["detail"]["instance-action"] == "hibernate", "the interruption warning's detail arrives intact")
rule_targets = {}
for logical, r in resources.items():
    if r["Type"] == "AWS::Events::Rule":
        rule_targets[logical] = [t["Arn"] for t in r["Properties"]["Targets"]]
policy = resources["FleetEventsQueuePolicy"]["Properties"]["PolicyDocument"]["Statement"]
(stmt,) = policy
allowed = [a["Fn::GetAtt"][0] for a in stmt["Condition"]["ArnEquals"]["aws:SourceArn"]]
check(stmt["Principal"] == {"Service": "events.amazonaws.com"} and stmt["Action"] == "sqs:SendMessage"
      and sorted(allowed) == sorted(rule_targets)
      and all(t == [{"Fn::GetAtt": ["FleetEventsQueue", "Arn"]}] for t in rule_targets.values()),
      "template: the queue policy admits exactly this stack's three rules (moto skips QueuePolicy)")

# ---- IAM ----------------------------------------------------------------------------------
role_name = profile_arn.rsplit("/", 1)[-1]
profile = iam.get_instance_profile(InstanceProfileName=role_name)["InstanceProfile"]
(role,) = profile["Roles"]
actions = set()
for pname in iam.list_role_policies(RoleName=role["RoleName"])["PolicyNames"]:
    doc = iam.get_role_policy(RoleName=role["RoleName"], PolicyName=pname)["PolicyDocument"]
    if isinstance(doc, str):  # moto's CloudFormation stores the policy's Python repr
        doc = ast.literal_eval(doc)
    for st in doc["Statement"]:
        acts = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
        res = st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]]
        if acts == ["ec2:CreateTags"]:
            # The one EC2 right: the activity tags the fleet scaler reads, on worker instances.
            cond = st.get("Condition", {})
            keys = cond.get("ForAllValues:StringEquals", {}).get("aws:TagKeys")
            keys = keys if isinstance(keys, list) else [keys]
            check(st["Effect"] == "Allow" and sorted(keys) == ["pacloud:activity", "pacloud:lease"]
                  and cond.get("StringEquals", {}).get("aws:ResourceTag/pacloud:role") == "worker"
                  and all(str(r).endswith(":instance/*") for r in res),
                  "worker role: ec2:CreateTags only of pacloud:activity/pacloud:lease, only on worker instances")
            continue
        check(st["Effect"] == "Allow" and "*" not in res and not any("*" in a for a in acts),
              f"worker role: {', '.join(acts)} on named resources only")
        actions.update(acts)
check(not iam.list_attached_role_policies(RoleName=role["RoleName"])["AttachedPolicies"], "worker role: no managed policies")
check(not any(a.startswith(("ec2:", "iam:", "events:")) for a in actions),
      "worker role: no other EC2, no IAM or EventBridge rights")

# ---- the build history in the bucket (template): workers write stats/*, the scaler reads one object
def statements(policies):
    for doc in policies:
        for st in doc.get("PolicyDocument", doc)["Statement"]:
            acts = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
            res = st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]]
            yield st, acts, [r.get("Fn::Sub", r) if isinstance(r, dict) else r for r in res]


scaler = resources["ScalerFunction"]["Properties"]
check(scaler["Environment"]["Variables"].get("PACLOUD_BUCKET") == {"Ref": "ArtifactBucket"},
      "scaler: PACLOUD_BUCKET names the artifact bucket (the build history)")
scaler_s3 = [(st["Effect"], acts, res) for st, acts, res in statements(scaler["Policies"])
             if any(a.startswith("s3:") for a in acts)]
check(scaler_s3 == [("Allow", ["s3:GetObject"], ["${ArtifactBucket.Arn}/stats/all.json"]),
                   ("Allow", ["s3:ListBucket"], [{"Fn::GetAtt": ["ArtifactBucket", "Arn"]}])],
      "scaler: s3:GetObject on exactly <bucket>/stats/all.json and s3:ListBucket, no other S3 right")
(list_stmt,) = [st for st, acts, _ in statements(scaler["Policies"]) if acts == ["s3:ListBucket"]]
check(list_stmt.get("Condition") == {"StringEquals": {"s3:prefix": "stats/all.json"}},
      "scaler: s3:ListBucket only for the prefix stats/all.json (a missing history is a 404, not a 403)")
worker_s3 = [(acts, res) for st, acts, res in statements(resources["WorkerRole"]["Properties"]["Policies"])
             if st["Effect"] == "Allow" and any(a.startswith("s3:") for a in acts)]
for want in ("s3:GetObject", "s3:PutObject"):
    for key in ("stats/all.json", "stats/atoms/app-misc/hello.json"):
        check(any(want in acts and any(fnmatch.fnmatchcase(f"${{ArtifactBucket.Arn}}/{key}", r) for r in res)
                  for acts, res in worker_s3),
              f"worker role: {want} covers the build history's {key}")

# ---- fleets: the template's own EC2Fleet properties through the EC2 API --------------------
lt_by_logical = {f"WorkerLaunchTemplate{k}": outputs[f"WorkerLaunchTemplate{k}Id"] for k in FAMILIES}
subnet_by_logical = {"PrivateSubnetA": subnet_ids[0], "PrivateSubnetB": subnet_ids[1]}


def resolve(node, key):
    if isinstance(node, dict):
        if set(node) == {"Ref"}:
            ref = node["Ref"]
            if ref in lt_by_logical:
                return lt_by_logical[ref]
            if ref in subnet_by_logical:
                return subnet_by_logical[ref]
            return int(template["Parameters"][ref]["Default"])
        if set(node) == {"Fn::GetAtt"}:
            return "1"
        if set(node) == {"Fn::FindInMap"}:
            _, k, field = node["Fn::FindInMap"]
            return cpu_map[k][field]
        return {k: resolve(v, key) for k, v in node.items()}
    if isinstance(node, list):
        return [resolve(v, key) for v in node]
    return node


for key, (name, _) in FAMILIES.items():
    props = resolve(resources[f"WorkerFleet{key}"]["Properties"], key)
    spot = props["SpotOptions"]
    check(props["Type"] == "maintain" and spot == {"AllocationStrategy": "price-capacity-optimized",
                                                  "InstanceInterruptionBehavior": "hibernate"}
          and props["TargetCapacitySpecification"]["DefaultTargetCapacityType"] == "spot"
          and props["ExcessCapacityTerminationPolicy"] == "no-termination",
          f"{name}: fleet is maintain / spot / price-capacity-optimized / hibernate / no-termination")
    # moto has no attribute-based selection: expand each InstanceRequirements
    # override into the catalogue's matching types, as EC2 itself does.
    configs = []
    for cfg in props["LaunchTemplateConfigs"]:
        overrides = []
        for o in cfg["Overrides"]:
            for t in matching[key]:
                overrides.append({"SubnetId": o["SubnetId"], "InstanceType": t})
        configs.append({"LaunchTemplateSpecification": cfg["LaunchTemplateSpecification"], "Overrides": overrides})
    fleet = ec2.create_fleet(
        Type=props["Type"],
        ExcessCapacityTerminationPolicy=props["ExcessCapacityTerminationPolicy"],
        ReplaceUnhealthyInstances=props["ReplaceUnhealthyInstances"],
        TargetCapacitySpecification=props["TargetCapacitySpecification"],
        SpotOptions=spot,
        LaunchTemplateConfigs=configs,
        TagSpecifications=props["TagSpecifications"],
    )
    check(fleet.get("FleetId", "").startswith("fleet-"), f"{name}: moto's EC2 API accepts the fleet ({fleet.get('FleetId')})")
decoy = ec2.create_fleet(Type="maintain", SpotOptions={"AllocationStrategy": "lowest-price"},
                         TargetCapacitySpecification={"TotalTargetCapacity": 0, "DefaultTargetCapacityType": "spot"},
                         LaunchTemplateConfigs=[{"LaunchTemplateSpecification": {"LaunchTemplateId": lt_by_logical["WorkerLaunchTemplateX8664"], "Version": "1"},
                                                 "Overrides": [{"InstanceType": "c5.xlarge", "SubnetId": subnet_ids[0]}]}],
                         TagSpecifications=[{"ResourceType": "fleet", "Tags": [{"Key": "pacloud:role", "Value": "decoy"},
                                                                              {"Key": "pacloud:cpu-family", "Value": "decoy"}]}])
# moto 5.2.5 ignores DescribeFleets filters (it returns every fleet), so the
# tag filter the scaler sends to EC2 is applied here to what moto returns.
created = {f["FleetId"] for f in ec2.describe_fleets()["Fleets"]}
found = {}
for f in ec2.describe_fleets()["Fleets"]:
    t = tags(f.get("Tags"))
    if t.get("pacloud:role") == "worker" and f["FleetId"] != decoy["FleetId"]:
        found.setdefault(t["pacloud:cpu-family"], []).append(f)
check(decoy["FleetId"] in created, "a decoy fleet tagged pacloud:role=decoy exists beside them")
check(sorted(found) == sorted(n for n, _ in FAMILIES.values()),
      f"filtering by pacloud:role=worker finds every family ({sorted(found)}) and not the decoy")
found = {k: v[-1] for k, v in found.items()}
for name, f in found.items():
    check(f["SpotOptions"].get("InstanceInterruptionBehavior") == "hibernate" and f["Type"] == "maintain",
          f"{name}: moto stored the fleet as maintain + hibernate")

# ---- Image Builder (lint-only: moto skips it) ----------------------------------------------
comp = yaml_parse(resources["WorkerComponent"]["Properties"]["Data"])
phases = {p["name"]: p for p in comp["phases"]}
commands = [c for st in phases["build"]["steps"] if st["action"] == "ExecuteBash" for c in st["inputs"]["commands"]]
check(set(phases) == {"build", "validate", "test"} and any(c.endswith("provision.sh --bundle /tmp/pacloud-bundle all") for c in commands),
      "template: the Image Builder component runs worker-image/provision.sh all from the bundle")
with open(os.path.join(here, "..", "worker-image", "provision.sh")) as f:
    provision = f.read()
for unit in ("pacloud-worker.service", "pacloud-imds-guard.service"):
    validate = " ".join(c for st in phases["validate"]["steps"] for c in st["inputs"]["commands"])
    check(unit in provision and unit in validate, f"template: the image's validate phase checks {unit}, which provision.sh installs")
for key, (name, _) in FAMILIES.items():
    lt = resources[f"WorkerLaunchTemplate{key}"]["Properties"]["LaunchTemplateData"]
    arch_key = "Arm64" if key == "Arm64" else "X8664"
    check(lt["ImageId"] == {"Fn::If": [f"Build{arch_key}", {"Fn::GetAtt": [f"WorkerImage{arch_key}", "ImageId"]}, {"Ref": f"WorkerAmi{arch_key}"}]},
          f"{name}: launch template uses the {arch_key} image built here or the WorkerAmi{arch_key} parameter")

# ---- parameter constraints (moto does not enforce them; this mirrors CloudFormation's rules) --
BAD = {
    "VpcCidr": ["10.42.0.0/24", "10.42.1.0/16", "300.1.0.0/16", "10.42.0.0"],
    "EgressMode": ["NAT", "internet", ""],
    "WorkerAmiX8664": ["ami-XYZ", "i-0123456789abcdef0", "ami-123"],
    "WorkerAmiArm64": ["ami-XYZ", "ami-0123abcd ", "ami-"],
    "ImageVersion": ["1.0", "v1.0.0", "1.0.0-rc1"],
    "ReleaseBucket": ["My_Bucket", "-bucket", "a"],
    "BundleKeyX8664": ["bundle.zip", "/abs.tar.gz", "../x.tar.gz"],
    "BundleKeyArm64": ["bundle.tar", "sp ace.tar.gz"],
    "KeyName": ["tab\there"],
    "InitialFleetCapacity": ["-1", "101"],
    "BuildsPerInstance": ["0", "9"],
}


def violates(spec, value):
    if "AllowedValues" in spec and value not in spec["AllowedValues"]:
        return True
    if "AllowedPattern" in spec and not re.fullmatch(spec["AllowedPattern"], value):
        return True
    if spec["Type"] == "Number":
        n = float(value)
        return ("MinValue" in spec and n < spec["MinValue"]) or ("MaxValue" in spec and n > spec["MaxValue"])
    return False


params = template["Parameters"]
for name, bad in BAD.items():
    spec = params[name]
    check(not violates(spec, str(spec["Default"])), f"parameter {name}: default {spec['Default']!r} is allowed")
    rejected = [v for v in bad if violates(spec, v)]
    check(rejected == bad, f"parameter {name}: rejects {bad} (let through: {[v for v in bad if v not in rejected]})")
    if "AllowedPattern" in spec:
        check(spec.get("ConstraintDescription", "").startswith(name), f"parameter {name}: its error message names it")
# ---- Rules (moto ignores them; this evaluates them the way CloudFormation does) ----------


def evaluate(node, values):
    if isinstance(node, dict):
        (fn, arg), = node.items()
        if fn == "Ref":
            return values[arg]
        if fn == "Fn::Equals":
            return evaluate(arg[0], values) == evaluate(arg[1], values)
        if fn == "Fn::Or":
            return any(evaluate(a, values) for a in arg)
        if fn == "Fn::And":
            return all(evaluate(a, values) for a in arg)
        if fn == "Fn::Not":
            return not evaluate(arg[0], values)
        sys.exit(f"fleet_check: no evaluator for {fn} in Rules")
    return node


def failed_assertions(overrides):
    values = {k: str(v.get("Default", "")) for k, v in template["Parameters"].items()}
    values.update(overrides)
    failed = []
    for rule in template.get("Rules", {}).values():
        if "RuleCondition" in rule and not evaluate(rule["RuleCondition"], values):
            continue
        failed += [a["AssertDescription"] for a in rule["Assertions"] if not evaluate(a["Assert"], values)]
    return failed


ami = {"WorkerAmiX8664": "ami-0123456789abcdef0", "WorkerAmiArm64": "ami-0123456789abcdef1"}
for overrides, names in [
    ({"ReleaseBucket": "releases"}, []),
    ({"ReleaseBucket": "releases", "EgressMode": "none"}, ["EgressMode"]),
    ({"WorkerAmiX8664": ami["WorkerAmiX8664"], "EgressMode": "none", "ReleaseBucket": "releases"}, ["EgressMode"]),
    ({}, ["ReleaseBucket"]),
    ({**ami, "EgressMode": "none"}, []),
]:
    failed = failed_assertions(overrides)
    check(len(failed) == len(names) and all(f.startswith(n) for f, n in zip(failed, names)),
          f"Rules with {overrides}: {'fails naming ' + ', '.join(names) if names else 'passes'} (got {failed})")

print(f"fleet_check: {checks} checks passed")
